"""Training throughput and MFU on one CUDA GPU for GPT-NeoX's model shapes (configs/*.yml).

    python benchmarks/gpu/train_throughput.py [--sizes 125M 350M 1-3B] [--seq-length 2048]
        [--modes eager checkpointed compiled] [--steps 6] [--budget-s 300] [--output FILE]

Each size runs in a fresh worker process (its own CUDA context) that builds Strata's real
Trainer once (bf16, ZeRO stage 1 as the NeoX configs have it, GPT-2 vocabulary from
$STRATA_ASSETS, a file of random tokens as data) and times its real train step in each mode:

    eager         every activation kept
    checkpointed  activation checkpointing of every block (checkpoint_num_layers 1)
    compiled      the torch_compile key: every block and the cross-entropy kernels compiled with
                  torch.compile, no recompute

A mode's micro-batch is the largest that fits: peak memory is measured at micro-batches 1 and 2,
the size that would fill 90% of the device is predicted from the difference (memory grows
linearly with the micro-batch) and tried, shrinking on out-of-memory. `compiled` reuses the
eager size (compilation per shape is slow; its memory is no larger). After the warm-up steps
the timed steps run back to back, with one device sync at each end, as in training.

TFLOP/s count the matmuls of forward and backward (3x forward) with the attention term, as
Megatron-LM and torchtitan do (megatron.logging.flops_per_token); recomputation is not counted.
MFU is against the device's dense bf16 peak (989 TFLOP/s for H100 SXM and H200). The peer, in
the same run and at the same micro-batch, is Hugging Face's GPTNeoXForCausalLM of the same shape
(bf16 autocast over fp32 weights, fused AdamW: what transformers' Trainer does with bf16).
A `--budget-s` stops starting new work once spent; whatever was skipped is named in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.train_cpu import (  # noqa: E402
    TIMING_RUN,
    tokenizer_settings,
    write_random_dataset,
)

MODES = ("eager", "checkpointed", "compiled")
# What a NeoX size config contributes: the model and its optimizer, nothing about the setup.
SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "norm",
    "pos_emb",
    "no_weight_tying",
    "gpt_j_residual",
    "init_method",
    "output_layer_init_method",
    "optimizer",
    "zero_optimization",
    "weight_decay",
    "gradient_clipping",
)
MEMORY_FILL = 0.90
WORKER_TIMEOUT_S = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["125M", "350M", "1-3B"])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-micro-batch", type=int, default=128)
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    parser.add_argument(
        "--profile-sizes",
        nargs="*",
        default=["1-3B"],
        help="sizes whose eager and compiled steps are profiled (kernel time breakdown)",
    )
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for size in args.sizes:
        if not (REPO / "configs" / f"{size}.yml").is_file():
            parser.error(f"--sizes: configs/{size}.yml does not exist")
    if args.steps < 1 or args.warmup_steps < 0 or args.max_micro_batch < 2:
        parser.error("--steps >= 1, --warmup-steps >= 0 and --max-micro-batch >= 2 are needed")
    return args


# -- the config ----------------------------------------------------------------------------------


def size_values(size: str) -> dict[str, Any]:
    """The model keys of configs/{size}.yml, read as NeoX reads it."""
    from megatron.neox_arguments.errors import Problems
    from megatron.neox_arguments.loading import load_files

    problems = Problems()
    raw = load_files([REPO / "configs" / f"{size}.yml"], problems)
    if problems.messages:
        raise SystemExit(f"configs/{size}.yml: " + "; ".join(problems.messages))
    return {k: v for k, v in raw.values.items() if k in SHAPE_KEYS}


def strata_values(size: str, seq_length: int, data_prefix: str | None) -> dict[str, Any]:
    values = {
        **size_values(size),
        "seq_length": seq_length,
        "max_position_embeddings": seq_length,
        "precision": "bf16",
        "bf16": {"enabled": True},
        # Built with recomputation on so the checkpointed mode can switch it per step.
        "checkpoint_activations": True,
        "checkpoint_num_layers": 1,
        "train_micro_batch_size_per_gpu": 1,
        "train_iters": 10_000,
        "log_interval": 10_000,
        "eval_interval": 10_000,
        **TIMING_RUN,
        **tokenizer_settings("gpt2"),
    }
    if data_prefix is not None:
        values["data_path"] = data_prefix
    return values


# -- the worker ----------------------------------------------------------------------------------


class Batches:
    """Endless micro-batches of random GPT-2 token ids, as the data loader yields them."""

    def __init__(self, vocab: int, seq_length: int) -> None:
        import torch

        self.vocab, self.seq_length, self.size = vocab, seq_length, 1
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        import torch

        shape = (self.size, self.seq_length + 1)
        text = torch.randint(0, self.vocab, shape, generator=self.generator)
        # Pinned, as the data loader's batches are on CUDA.
        return {"text": text.pin_memory() if torch.cuda.is_available() else text}


def fits(trainer, batches: Batches, size: int) -> tuple[bool, float]:
    """Whether one train step at micro-batch `size` fits; its peak memory in bytes."""
    import torch

    batches.size = size
    torch.cuda.reset_peak_memory_stats()
    try:
        float(trainer.train_step(batches)["lm_loss"])
        return True, float(torch.cuda.max_memory_allocated())
    except torch.OutOfMemoryError:
        pass
    # Outside the handler: the traceback (and the activations it holds) is gone by now.
    trainer.engine.zero_grad()
    for param in trainer.engine.module.parameters():
        param.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return False, float("nan")


def largest_micro_batch(trainer, batches: Batches, limit: int) -> dict[str, Any]:
    """The largest micro-batch whose step fits, predicted from peaks at 1 and 2, then tried."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    peaks = {}
    for size in (1, 2):
        ok, peaks[size] = fits(trainer, batches, size)
        if not ok:
            raise RuntimeError(f"micro-batch {size} does not fit in {total / 2**30:.0f} GiB")
    per_sample = max(peaks[2] - peaks[1], 1.0)
    base = peaks[1] - per_sample
    predicted = int((MEMORY_FILL * total - base) // per_sample)
    size, tried = max(2, min(limit, predicted)), []
    while size > 2:
        ok, _ = fits(trainer, batches, size)
        tried.append(size)
        if ok:
            break
        size = max(2, int(size * 0.85))
    return {
        "micro_batch": size,
        "predicted_max_micro_batch": predicted,
        "memory_per_sample_gib": round(per_sample / 2**30, 3),
        "tried": tried,
    }


def timed_steps(trainer, batches: Batches, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    for _ in range(warmup):
        trainer.train_step(batches)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(trainer.train_step(batches)["lm_loss"])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "step_seconds": elapsed / steps,
        "loss_last": float(losses[-1]),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


# Kernel name fragments -> category, first match wins (cuBLAS/CUTLASS GEMMs have many names).
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
)


def kernel_profile(trainer, batches: Batches, steps: int = 2, top: int = 30) -> dict[str, Any]:
    """Where a step's time goes: GPU busy time against wall time, per kernel category and the
    top kernels; the host's synchronizing calls and where in the Python code they come from."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    averages = prof.key_averages()
    events = [e for e in averages if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    busy_ms = sum(e.device_time_total for e in events) / 1e3 / steps
    categories: dict[str, float] = {}
    for event in events:
        name = event.key.lower()
        category = next(
            (c for c, parts in KERNEL_CATEGORIES if any(p in name for p in parts)), "other"
        )
        categories[category] = categories.get(category, 0.0) + event.device_time_total
    host_waits = {
        e.key: {
            "calls_per_step": e.count / steps,
            "ms_per_step": round(e.cpu_time_total / 1e3 / steps, 2),
        }
        for e in averages
        if "Synchronize" in e.key or e.key in ("aten::_local_scalar_dense", "aten::nonzero")
    }
    return {
        "wall_ms_per_step_profiled": round(wall_ms, 1),
        "gpu_busy_ms_per_step": round(busy_ms, 1),
        "ms_per_step_by_category": {
            c: round(t / 1e3 / steps, 1) for c, t in sorted(categories.items(), key=lambda x: -x[1])
        },
        "top_kernels": [
            {
                "kernel": e.key[:100],
                "ms_per_step": round(e.device_time_total / 1e3 / steps, 2),
                "calls_per_step": e.count // steps,
            }
            for e in events[:top]
        ],
        "host_waits": host_waits,
        "sync_sites": sync_sites(trainer, batches),
    }


def sync_sites(trainer, batches: Batches) -> dict[str, int]:
    """Python lines that make the host wait for the device during one step (CUDA's sync debug
    mode warns at each), with how often."""
    import warnings

    import torch

    sites: dict[str, int] = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message).lower():
            site = f"{Path(warning.filename).name}:{warning.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return sites


def throughput(timing: dict[str, Any], micro_batch: int, args, peak: float | None) -> dict:
    from megatron.logging import flops_per_token

    tokens_per_sec = micro_batch * args.seq_length / timing["step_seconds"]
    tflops = tokens_per_sec * flops_per_token(args) / 1e12
    return {
        "tokens_per_sec": round(tokens_per_sec, 1),
        "tflops": round(tflops, 1),
        "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
    }


def measure_strata(config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from megatron.config import NeoXArgs
    from megatron.logging import device_peak_flops
    from megatron.model.compile import compile_transformer_blocks
    from megatron.model.gpt_model import count_parameters
    from megatron.mpu import compile_cross_entropy_kernels
    from megatron.training import Trainer

    args = NeoXArgs.from_dict(strata_values(config["size"], config["seq_length"], config["data"]))
    trainer = Trainer(args)
    model = trainer.engine.module
    batches = Batches(trainer.tokenizer.vocab_size, args.seq_length)
    peak = device_peak_flops()
    result: dict[str, Any] = {
        "parameters": count_parameters(model),
        "optimizer": type(trainer.engine.optimizer).__name__,
        "zero_stage": args.zero_stage,
        "modes": {},
    }
    eager_size = None
    for mode in config["modes"]:
        if time.monotonic() > config["deadline"]:
            result["modes"][mode] = {"skipped": "budget spent"}
            continue
        model.checkpoint_num_layers = 1 if mode == "checkpointed" else 0
        if mode == "compiled":  # as the torch_compile key does
            compile_transformer_blocks(model)
            compile_cross_entropy_kernels()
        began = time.monotonic()
        if mode == "compiled" and eager_size:
            sizing = {"micro_batch": eager_size, "from": "eager"}
        else:
            sizing = largest_micro_batch(trainer, batches, config["max_micro_batch"])
        batches.size = sizing["micro_batch"]
        timing = timed_steps(trainer, batches, config["warmup_steps"], config["steps"])
        result["modes"][mode] = {
            **sizing,
            **timing,
            **throughput(timing, sizing["micro_batch"], args, peak),
        }
        if config["profile"] and mode != "checkpointed":
            try:
                result["modes"][mode]["profile"] = kernel_profile(trainer, batches)
            except (RuntimeError, AssertionError) as err:  # the numbers above still count
                result["modes"][mode]["profile"] = {"error": str(err)}
        result["modes"][mode]["mode_seconds"] = round(time.monotonic() - began, 1)
        if mode == "eager":
            eager_size = sizing["micro_batch"]
        shown = {k: v for k, v in result["modes"][mode].items() if k != "profile"}
        print(f"{config['size']} {mode}: {json.dumps(shown)}", file=sys.stderr)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure_hf(config: dict[str, Any]) -> dict[str, Any]:
    """The peer: transformers' GPTNeoXForCausalLM of the same shape at the same micro-batch."""
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from megatron.config import NeoXArgs
    from megatron.logging import device_peak_flops

    args = NeoXArgs.from_dict(strata_values(config["size"], config["seq_length"], None))
    hidden = args.hidden_size
    hf_config = GPTNeoXConfig(
        vocab_size=args.padded_vocab_size,
        hidden_size=hidden,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu",
        rotary_pct=args.rotary_pct,
        max_position_embeddings=args.seq_length,
        use_parallel_residual=args.gpt_j_residual,
        tie_word_embeddings=not args.no_weight_tying,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cache=False,
    )
    with torch.device("cuda"):
        model = GPTNeoXForCausalLM._from_config(hf_config, attn_implementation="sdpa")
    model.train()
    adam = args.optimizer["params"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=adam["lr"], betas=tuple(adam["betas"]), fused=True
    )
    generator = torch.Generator(device="cuda").manual_seed(0)

    def step(size: int) -> torch.Tensor:
        text = torch.randint(
            0, 50257, (size, args.seq_length + 1), device="cuda", generator=generator
        )
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=text[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), text[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # Strata's micro-batch, halved while it does not fit (fp32 weights take more memory). Two
    # steps: the first creates the optimizer states the second must fit beside.
    size = config["micro_batch"]
    while True:
        try:
            step(size)
            step(size)
            break
        except torch.OutOfMemoryError:
            pass
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        if size == 1:
            raise RuntimeError("micro-batch 1 does not fit")
        size //= 2
    for _ in range(config["warmup_steps"]):
        step(size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        loss = step(size)
    torch.cuda.synchronize()
    timing = {
        "step_seconds": (time.perf_counter() - start) / config["steps"],
        "loss_last": float(loss),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    return {
        "micro_batch": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        **timing,
        **throughput(timing, size, args, device_peak_flops()),
    }


def worker_main(kind: str, config: dict[str, Any], result_path: Path) -> None:
    result = measure_strata(config) if kind == "strata" else measure_hf(config)
    partial = result_path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(result_path)


def run_worker(kind: str, config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    result_path = workdir / f"{kind}-{config['size']}.json"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "PYTHONPATH": path}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    command += ["--result", str(result_path)]
    done = subprocess.run(
        command,
        input=json.dumps(config),
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines() if ": {" in line))
    if done.returncode != 0 or not result_path.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        return {"error": f"{kind} worker exited {done.returncode}", "log_tail": tail}
    return json.loads(result_path.read_text())


# -- the report ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torch

    from megatron.logging import device_peak_flops

    names = ("torch", "deepspeed", "transformers", "triton")
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "device": torch.cuda.get_device_name(),
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "peak_bf16_tflops": (device_peak_flops() or 0) / 1e12 or None,
        "cuda": torch.version.cuda,
        **{name: installed(name) for name in names},
    }


def matmul_tflops() -> float:
    """Achieved bf16 TFLOP/s of a large square matmul: the ceiling the model can approach."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(2 * n**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    if cli.worker:
        worker_main(cli.worker, json.loads(sys.stdin.read()), cli.result)
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (see benchmarks/train_cpu.py)")
    deadline = time.monotonic() + cli.budget_s
    report: dict[str, Any] = {
        "benchmark": "gpu_train_throughput",
        "date": time.strftime("%Y-%m-%d"),
        **environment(),
        "matmul_bf16_tflops_8192": matmul_tflops(),
        "seq_length": cli.seq_length,
        "steps": cli.steps,
        "warmup_steps": cli.warmup_steps,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="strata-gpubench-") as tmp:
        workdir = Path(tmp)
        data = write_random_dataset(workdir / "data" / "random", 50257, 4_000_000, seed=1234)
        for size in cli.sizes:
            if time.monotonic() > deadline:
                report["sizes"][size] = {"skipped": "budget spent"}
                continue
            config = {
                "size": size,
                "seq_length": cli.seq_length,
                "modes": cli.modes,
                "warmup_steps": cli.warmup_steps,
                "steps": cli.steps,
                "max_micro_batch": cli.max_micro_batch,
                "data": data,
                "profile": size in cli.profile_sizes,
                # Wall-clock deadline shared with the worker (same machine, same clock).
                "deadline": deadline,
            }
            entry = {"strata": run_worker("strata", config, workdir)}
            eager = entry["strata"].get("modes", {}).get("eager", {})
            if not cli.no_peer and "micro_batch" in eager and time.monotonic() < deadline:
                peer = run_worker("hf", {**config, "micro_batch": eager["micro_batch"]}, workdir)
                entry["hf_transformers"] = peer
                if "tokens_per_sec" in peer:
                    entry["ratio_strata_eager_over_hf"] = round(
                        eager["tokens_per_sec"] / peer["tokens_per_sec"], 3
                    )
            report["sizes"][size] = entry
    text = json.dumps(report, indent=2)
    if cli.output:
        cli.output.parent.mkdir(parents=True, exist_ok=True)
        cli.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
