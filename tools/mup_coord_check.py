"""muP coordinate check: how activation scales change with width, with and without muP.

    python tools/mup_coord_check.py --widths 64,128,256,512 --steps 4 --output-dir coord_check

For each width, trains a tiny model (CPU, seconds) for a few Adam steps on a fixed random batch,
once in the standard parametrisation (SP) and once with ``use_mup`` (base width: the smallest
width), and records the mean |x| of every tracked activation (embedding, each layer's attention
and MLP outputs, each layer's output, the logits) at each step. Writes ``coord_check.json`` and
``coord_check.png`` into --output-dir and prints a verdict: under muP the scale of each activation
is flat in width (the slope of log scale against log width, at the last step, stays within
--flat-tol of 0), while in SP it grows (the largest slope is at least --grow-min). Exit status:
0 when the check passes, 1 when it fails or on bad input (``error: ...``), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron.cli import exit_status
from megatron.config import ConfigError, NeoXArgs
from megatron.model import GPTModel, ModelConfig
from megatron.mpu import vocab_parallel_cross_entropy
from megatron.optimizers import build_optimizer
from megatron.utils import atomic_write_json

PARAMETRISATIONS = ("sp", "mup")
LABELS = {"sp": "SP", "mup": "muP"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256,512", help="comma-separated hidden sizes")
    parser.add_argument("--steps", type=int, default=4, help="Adam steps per model (default 4)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seq-length", type=int, default=32, help="default 32")
    parser.add_argument("--batch-size", type=int, default=8, help="default 8")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seeds", type=int, default=2, help="models averaged per width (2)")
    parser.add_argument("--flat-tol", type=float, default=0.25, help="muP |slope| bound (0.25)")
    parser.add_argument("--grow-min", type=float, default=0.5, help="least SP slope (0.5)")
    parser.add_argument("--output-dir", required=True, help="where to write the JSON and PNG")
    args = parser.parse_args(argv)
    try:
        args.widths = sorted({int(w) for w in args.widths.split(",")})
    except ValueError:
        parser.error(f"--widths must be comma-separated integers, got {args.widths!r}")
    if len(args.widths) < 2 or args.widths[0] < 1:
        parser.error("--widths needs at least two positive widths")
    bad = [w for w in args.widths if w % args.heads]
    if bad:
        parser.error(f"widths {bad} are not divisible by --heads {args.heads}")
    for name in ("steps", "layers", "heads", "seq_length", "batch_size", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def model_args(opts: argparse.Namespace, width: int, mup: bool, seed: int) -> NeoXArgs:
    """A NeoX config for one tiny model (bytes tokenizer, fp32, no dropout, untied head)."""
    config: dict[str, Any] = {
        "num_layers": opts.layers,
        "hidden_size": width,
        "num_attention_heads": opts.heads,
        "seq_length": opts.seq_length,
        "max_position_embeddings": opts.seq_length,
        "pos_emb": "rotary",
        "no_weight_tying": True,
        "precision": "fp32",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "weight_decay": 0.0,
        "optimizer": {"type": "Adam", "params": {"lr": opts.lr, "betas": [0.9, 0.95]}},
        "train_micro_batch_size_per_gpu": opts.batch_size,
        "train_iters": opts.steps,
        "tokenizer_type": "bytes",
        "num_gpus": 1,
        "seed": seed,
        "use_mup": mup,
    }
    if mup:
        config["mup_base_width"] = opts.widths[0]
    return NeoXArgs.from_dict(config)


def tracked_modules(model: GPTModel) -> dict[str, torch.nn.Module]:
    modules: dict[str, torch.nn.Module] = {"embedding": model.embedding}
    for i, layer in enumerate(model.layers):
        modules[f"layers.{i}.attention"] = layer.attention
        modules[f"layers.{i}.mlp"] = layer.mlp
        modules[f"layers.{i}"] = layer
    modules["logits"] = model.lm_head
    return modules


def train_and_record(args: NeoXArgs, tokens: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """Mean |x| of each tracked activation at steps 0..steps (after that many updates)."""
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = build_optimizer(args, model)  # muP: hidden matrices at lr / m
    scales: dict[str, list[float]] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            scales.setdefault(name, []).append(output.detach().abs().mean().item())

        return record

    for name, module in tracked_modules(model).items():
        module.register_forward_hook(hook(name))
    for step in range(steps + 1):
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return scales


def log_slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """{"widths", "scales": {param: {width: {module: [per step]}}}, "slopes", verdict fields}."""
    torch.set_num_threads(1)
    scales: dict[str, dict[int, dict[str, list[float]]]] = {p: {} for p in PARAMETRISATIONS}
    for param in PARAMETRISATIONS:
        for width in opts.widths:
            runs = []
            for seed in range(opts.seeds):
                gen = torch.Generator().manual_seed(seed)
                tokens = torch.randint(
                    0, 256, (opts.batch_size, opts.seq_length + 1), generator=gen
                )
                args = model_args(opts, width, param == "mup", 1234 + seed)
                runs.append(train_and_record(args, tokens, opts.steps))
            scales[param][width] = {
                name: np.mean([r[name] for r in runs], axis=0).tolist() for name in runs[0]
            }
    slopes = {
        param: {
            name: log_slope(opts.widths, [scales[param][w][name][-1] for w in opts.widths])
            for name in scales[param][opts.widths[0]]
        }
        for param in PARAMETRISATIONS
    }
    mup_worst = max(abs(s) for s in slopes["mup"].values())
    sp_worst = max(slopes["sp"].values())
    return {
        "widths": opts.widths,
        "steps": opts.steps,
        "lr": opts.lr,
        "scales": scales,
        "slopes": slopes,
        "mup_max_abs_slope": mup_worst,
        "sp_max_slope": sp_worst,
        "flat_tol": opts.flat_tol,
        "grow_min": opts.grow_min,
        "passed": mup_worst <= opts.flat_tol and sp_worst >= opts.grow_min,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per parametrisation: last-step scale of each activation against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = report["widths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, param in zip(axes, PARAMETRISATIONS):
        per_width = report["scales"][param]
        for name in per_width[widths[0]]:
            values = [per_width[w][name][-1] for w in widths]
            ax.plot(
                widths, values, marker="o", label=f"{name} ({report['slopes'][param][name]:+.2f})"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (hidden_size)")
        ax.set_title(f"{LABELS[param]}: mean |x| after {report['steps']} Adam steps")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean |activation|")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    out = Path(opts.output_dir)

    def work() -> int | None:
        out.mkdir(parents=True, exist_ok=True)
        report = run(opts)
        atomic_write_json(out / "coord_check.json", report)
        plot(report, out / "coord_check.png")
        for param in PARAMETRISATIONS:
            slopes = ", ".join(f"{k} {v:+.2f}" for k, v in report["slopes"][param].items())
            print(f"{param}: slope of log mean|x| vs log width: {slopes}")
        mup, sp = report["mup_max_abs_slope"], report["sp_max_slope"]
        if report["passed"]:
            print(
                f"PASS: muP activations are flat in width (max |slope| {mup:.2f} <= {opts.flat_tol}); "
                f"SP's grow (max slope {sp:.2f} >= {opts.grow_min})"
            )
        else:
            print(
                f"FAIL: muP max |slope| {mup:.2f} (want <= {opts.flat_tol}), SP max slope {sp:.2f} "
                f"(want >= {opts.grow_min})"
            )
        print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
        return 0 if report["passed"] else 1

    return exit_status(work, (ConfigError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
