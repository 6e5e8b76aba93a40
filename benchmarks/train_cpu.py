"""CPU training throughput: Strata against Hugging Face's GPTNeoXForCausalLM on the same shape.

Both sides train the same GPT-NeoX model (same parameter count, fp32, AdamW, gradient clipping
1.0, no dropout) on the same micro batch and sequence length, for the same warmup and timed
steps, with the same number of threads. Strata runs its real train step (DeepSpeed engine, data
loader, LR scheduler, gradient-norm logging); the peer is a plain PyTorch loop. Prints one JSON
object with tokens/s for each and the ratio strata / hf. Timings are reported, never checked.

    .venv/bin/python benchmarks/train_cpu.py [--layers 4 --hidden 256 ... --repeats 3]

Each measurement runs in a fresh subprocess of this script (`--worker`): the two frameworks then
share no allocator caches, thread pools, or DeepSpeed / torch.distributed global state, and the
one that runs second gets no warm-up from the first. With `--repeats` above 1 (3 by default)
the order alternates between rounds; throughput comes from the median step over all rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron.tokenizer import build_tokenizer

# torch, DeepSpeed and transformers are imported only in the worker processes (see above).
FRAMEWORKS = ("strata", "hf_transformers")
# Bounds the time spent on one framework's measurement (setup included).
WORKER_TIMEOUT_S = 1800


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rotary-pct", type=float, default=0.25)
    parser.add_argument(
        "--tokenizer",
        choices=("bytes", "gpt2"),
        default="bytes",
        help="bytes: 257 tokens, padded to 384; gpt2: 50257, padded to 50304 (GPT-2 BPE files "
        "from $STRATA_ASSETS/tokenizers)",
    )
    parser.add_argument(
        "--parallel-residual",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gpt_j_residual / use_parallel_residual (Pythia-style; default on)",
    )
    parser.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="tie input and output embeddings (Pythia does not; default off)",
    )
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of both measurements, in alternating order",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both sides (default: $OMP_NUM_THREADS, else the core count)",
    )
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("layers", "hidden", "heads", "seq_length", "micro_batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be 0 or more")
    return args


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        try:
            return int(env)
        except ValueError:
            raise SystemExit(f"OMP_NUM_THREADS={env!r} is not an integer") from None
    return os.cpu_count() or 1


# -- the shared config ---------------------------------------------------------------------------


def tokenizer_settings(tokenizer: str) -> dict[str, Any]:
    if tokenizer == "bytes":
        return {"tokenizer_type": "bytes"}
    assets = os.environ.get("STRATA_ASSETS")
    if not assets:
        raise SystemExit("--tokenizer gpt2 reads the GPT-2 BPE files from $STRATA_ASSETS; set it")
    folder = Path(assets) / "tokenizers"
    return {
        "tokenizer_type": "GPT2BPETokenizer",
        "vocab_file": str(folder / "gpt2-vocab.json"),
        "merge_file": str(folder / "gpt2-merges.txt"),
    }


# What a timing run sets whatever the model: no dropout, a constant LR from the first step, one
# micro-batch per step, no evaluation, batches read in this process (loader workers would
# compete with the training threads for the same cores), one device.
TIMING_RUN = {
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "lr_decay_style": "constant",
    "warmup": 0.0,
    "gradient_accumulation_steps": 1,
    "eval_iters": 0,
    "split": "100,0,0",
    "num_workers": 0,
    "num_gpus": 1,
    "seed": 1234,
}


def strata_values(config: dict[str, Any], data_prefix: str | None) -> dict[str, Any]:
    """The NeoX config for the benchmark shape: fp32, AdamW, constant LR, no dropout, no eval."""
    values = {
        "num_layers": config["layers"],
        "hidden_size": config["hidden"],
        "num_attention_heads": config["heads"],
        "seq_length": config["seq_length"],
        "max_position_embeddings": config["seq_length"],
        "pos_emb": "rotary",
        "rotary_pct": config["rotary_pct"],
        "gpt_j_residual": config["parallel_residual"],
        "no_weight_tying": not config["tie_embeddings"],
        "norm": "layernorm",
        "activation": "gelu",
        "optimizer": {"type": "Adam", "params": {**config["adam"]}},
        "weight_decay": config["weight_decay"],
        "gradient_clipping": config["gradient_clipping"],
        "train_micro_batch_size_per_gpu": config["micro_batch"],
        "train_iters": config["warmup_steps"] + config["steps"],
        "eval_interval": config["warmup_steps"] + config["steps"] + 1,
        **TIMING_RUN,
        **tokenizer_settings(config["tokenizer"]),
    }
    if data_prefix is not None:
        values["data_path"] = data_prefix
    return values


def write_random_dataset(prefix: Path, vocab_size: int, num_tokens: int, seed: int) -> str:
    """A .bin/.idx of uniformly random token ids: the values do not change the arithmetic."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    document_length = 1024
    for _ in range(-(-num_tokens // document_length)):
        builder.add_item(rng.integers(0, vocab_size, document_length, dtype=np.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


# -- measurement -----------------------------------------------------------------------------------


def time_steps(step: Callable[[], float], warmup: int, steps: int) -> dict[str, Any]:
    """Run `warmup` untimed steps, then time `steps` steps; `step` returns the loss."""
    for _ in range(warmup):
        step()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return {"step_times": times, "loss_start": losses[0], "loss_end": losses[-1]}


def measure_strata(config: dict[str, Any]) -> dict[str, Any]:
    from megatron.config import NeoXArgs
    from megatron.model.gpt_model import count_parameters
    from megatron.training import Trainer

    args = NeoXArgs.from_dict(strata_values(config, config["data_prefix"]))
    trainer = Trainer(args)
    train_iter = trainer._loader(trainer.train_ds, 0)
    timing = time_steps(
        # Read back every step, as the peer's loss.item() is (train_step keeps it a tensor).
        lambda: float(trainer.train_step(train_iter)["lm_loss"]),
        config["warmup_steps"],
        config["steps"],
    )
    return {**timing, "parameters": count_parameters(trainer.engine.module)}


def measure_hf(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(1234)
    hf_config = GPTNeoXConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden"],
        num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"],
        intermediate_size=4 * config["hidden"],
        hidden_act="gelu",
        rotary_pct=config["rotary_pct"],
        rotary_emb_base=10000,
        max_position_embeddings=config["seq_length"],
        layer_norm_eps=1e-5,
        use_parallel_residual=config["parallel_residual"],
        tie_word_embeddings=config["tie_embeddings"],
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cache=False,
    )
    model = GPTNeoXForCausalLM._from_config(hf_config, attn_implementation="sdpa")
    model.train()
    # The same grouping as Strata: no weight decay on biases and norm parameters.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    adam = config["adam"]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=adam["lr"],
        betas=tuple(adam["betas"]),
        eps=adam["eps"],
    )
    total = config["warmup_steps"] + config["steps"]
    shape = (total, config["micro_batch"], config["seq_length"] + 1)
    batches = iter(torch.randint(0, config["vocab_size"], shape))

    def step() -> float:
        text = next(batches)
        tokens, labels = text[:, :-1], text[:, 1:]
        # Strata's loss: mean cross-entropy over all seq_length next-token predictions.
        logits = model(input_ids=tokens).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["gradient_clipping"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    timing = time_steps(step, config["warmup_steps"], config["steps"])
    return {**timing, "parameters": sum(p.numel() for p in model.parameters())}


def worker_main(framework: str, config: dict[str, Any], result_path: Path) -> None:
    import torch

    torch.set_num_threads(config["threads"])
    result = measure_strata(config) if framework == "strata" else measure_hf(config)
    partial = result_path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(result_path)


def run_worker(framework: str, config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    result_path = workdir / f"{framework}.json"
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(config["threads"]),
        "DS_ACCELERATOR": "cpu",
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", framework]
    command += ["--config", json.dumps(config), "--result", str(result_path)]
    # Worker output (DeepSpeed's log lines) is kept off stdout, which carries only the JSON.
    done = subprocess.run(
        command, env=env, cwd=workdir, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
    )
    if done.returncode != 0 or not result_path.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise RuntimeError(f"{framework} measurement failed (exit {done.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def summarise(rounds: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """Throughput from the median timed step over all rounds.

    The median, not the mean: on a shared machine other processes take the cores for a few
    seconds at a time, which stretches some steps several-fold (see rounds_tokens_per_sec).
    """
    times = [t for r in rounds for t in r["step_times"]]
    median = statistics.median(times)
    return {
        "tokens_per_sec": tokens_per_step / median,
        "step_seconds": median,
        "step_seconds_mean": statistics.fmean(times),
        "step_seconds_min": min(times),
        "loss_start": rounds[0]["loss_start"],
        "loss_end": rounds[0]["loss_end"],
        "rounds_tokens_per_sec": [
            tokens_per_step * len(r["step_times"]) / sum(r["step_times"]) for r in rounds
        ],
    }


def padded_vocab(values: dict[str, Any]) -> tuple[int, int]:
    """(tokenizer vocabulary, padded vocabulary) as Strata's config validation derives them."""
    from megatron.config import NeoXArgs

    args = NeoXArgs.from_dict(values)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    return tokenizer.vocab_size, args.padded_vocab_size


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "deepspeed", "transformers")}


def main(argv: list[str] | None = None) -> None:
    cli = parse_args(argv)
    if cli.worker:
        worker_main(cli.worker, json.loads(cli.config), Path(cli.result))
        return
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("the peer needs transformers: install the `hf` extra (pip install .[hf])")
    threads = cli.threads or default_threads()
    config: dict[str, Any] = {
        "layers": cli.layers,
        "hidden": cli.hidden,
        "heads": cli.heads,
        "seq_length": cli.seq_length,
        "micro_batch": cli.micro_batch,
        "rotary_pct": cli.rotary_pct,
        "tokenizer": cli.tokenizer,
        "parallel_residual": cli.parallel_residual,
        "tie_embeddings": cli.tie_embeddings,
        "precision": "fp32",
        "adam": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8},
        "weight_decay": 0.01,
        "gradient_clipping": 1.0,
        "warmup_steps": cli.warmup_steps,
        "steps": cli.steps,
        "threads": threads,
    }
    config["vocab_size"], config["padded_vocab_size"] = padded_vocab(strata_values(config, None))
    tokens_per_step = cli.micro_batch * cli.seq_length
    load_before = os.getloadavg()[0]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in FRAMEWORKS}
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        workdir = Path(tmp)
        samples = (cli.warmup_steps + cli.steps) * cli.micro_batch
        config["data_prefix"] = write_random_dataset(
            workdir / "data" / "random",
            config["vocab_size"],
            num_tokens=2 * samples * (cli.seq_length + 1),
            seed=1234,
        )
        for index in range(cli.repeats):
            order = FRAMEWORKS if index % 2 == 0 else FRAMEWORKS[::-1]
            for framework in order:
                rounds[framework].append(run_worker(framework, config, workdir))
    counts = {name: rounds[name][0]["parameters"] for name in FRAMEWORKS}
    if counts["strata"] != counts["hf_transformers"]:
        raise RuntimeError(f"the two models differ in size: parameter counts {counts}")
    results = {name: summarise(rounds[name], tokens_per_step) for name in FRAMEWORKS}
    shown = {k: v for k, v in config.items() if k not in ("data_prefix", "threads")}
    report = {
        "benchmark": "train_cpu",
        "config": {**shown, "tokens_per_step": tokens_per_step, "repeats": cli.repeats},
        "parameters": counts["strata"],
        "threads": threads,
        # Other processes on the machine slow both sides; this says how busy it was.
        "load_average_1min_before": load_before,
        **results,
        "ratio": results["strata"]["tokens_per_sec"] / results["hf_transformers"]["tokens_per_sec"],
        **versions(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
