"""Write (and optionally run) a grid of training runs from one base config.

    python tools/scaling/sweep.py CONFIG.yml [MORE.yml ...] [key=value ...] --out sweeps/NAME \\
        [--width 256 512] [--depth 4 8] [--lr 1e-3 3e-3] [--tokens 1e8 3e8 | --flops 1e17]
        [--seed 1 2] [--local]

Every combination becomes `OUT/runs/<name>/run.yml`, the name encoding the grid point
(`w256-d4-lr0.001-t1e8-s1`); `OUT/sweep.sbatch` runs them as a SLURM array (`sbatch` it), or
`--local` runs them here one after another. Widths keep the base's head size (heads = width /
head size) and muP's base width (`mup_base_width`, the base's hidden_size when unset), so a
muP learning rate transfers; `--tokens` sets train_iters from the global batch, `--flops` sets
the tokens to C / 6N for each model size (iso-FLOP profiles).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megatron.config  # noqa: E402, F401  (every config rule registered)
from megatron.neox_arguments import ConfigError, NeoXArgs  # noqa: E402
from megatron.neox_arguments.errors import Problems  # noqa: E402
from megatron.neox_arguments.loading import apply_overrides, load_files  # noqa: E402
from megatron.neox_arguments.sizes import parameter_counts  # noqa: E402
from tools.scaling.launch import run_local, write_sweep  # noqa: E402

# Grid dimension -> name prefix, in the order names list them.
DIMENSIONS = {"width": "w", "depth": "d", "lr": "lr", "tokens": "t", "flops": "f", "seed": "s"}


def short(value: float) -> str:
    """1e8 -> '1e8', 3e-4 -> '0.0003', 256 -> '256': a number as it may sit in a folder name."""
    return f"{value:.4g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def run_name(point: dict[str, Any]) -> str:
    return "-".join(f"{DIMENSIONS[key]}{short(value)}" for key, value in point.items())


def load_base(files: list[str], overrides: list[str]) -> dict[str, Any]:
    problems = Problems()
    raw = load_files(files, problems)
    apply_overrides(raw, overrides, problems)
    problems.raise_if_any()
    return raw.values


def shape(base: dict[str, Any], width: int) -> dict[str, Any]:
    """The base's keys at another width: same head size, same muP base width, MLP scaled."""
    base_width, heads = base["hidden_size"], base["num_attention_heads"]
    head_size = base_width // heads
    if width % head_size:
        raise ConfigError(f"--width {width}: not a multiple of the base's head size {head_size}")
    new_heads = width // head_size
    keys: dict[str, Any] = {"hidden_size": width, "num_attention_heads": new_heads}
    if base.get("num_kv_heads"):
        keys["num_kv_heads"] = max(1, base["num_kv_heads"] * new_heads // heads)
    if base.get("intermediate_size"):
        keys["intermediate_size"] = base["intermediate_size"] * width // base_width
    if base.get("use_mup"):
        keys["mup_base_width"] = base.get("mup_base_width") or base_width
    return keys


def point_config(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The base config at one grid point, train_iters included (validated)."""
    config = copy.deepcopy(base)
    if "width" in point:
        config.update(shape(base, point["width"]))
    if "depth" in point:
        config["num_layers"] = point["depth"]
    if "lr" in point:
        if not isinstance(config.get("optimizer"), dict):
            raise ConfigError("--lr needs the base config's optimizer dict (optimizer.params.lr)")
        config["optimizer"].setdefault("params", {})["lr"] = point["lr"]
    if "seed" in point:
        config["seed"] = point["seed"]
    budget = {key: point[key] for key in ("tokens", "flops") if key in point}
    if budget:
        if config.get("lr_decay_iters"):
            raise ConfigError(
                "the base config sets lr_decay_iters, but the token budget changes train_iters: "
                "use lr_decay_fraction (or neither: the decay then spans train_iters)"
            )
        args = NeoXArgs.from_dict({**config, "train_iters": config.get("train_iters") or 1})
        tokens = budget.get("tokens") or budget["flops"] / (6 * parameter_counts(args)["total"])
        config["train_iters"] = max(
            1, math.ceil(tokens / (args.train_batch_size * args.seq_length))
        )
    NeoXArgs.from_dict(config)  # every run valid before any is submitted
    return config


def grid(options: argparse.Namespace) -> list[dict[str, Any]]:
    axes = {key: getattr(options, key) for key in DIMENSIONS if getattr(options, key)}
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, nargs="+", help="hidden sizes")
    parser.add_argument("--depth", type=int, nargs="+", help="numbers of layers")
    parser.add_argument("--lr", type=float, nargs="+", help="peak learning rates")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, nargs="+", help="training tokens per run")
    budget.add_argument("--flops", type=float, nargs="+", help="compute per run, C = 6ND")
    parser.add_argument("--seed", type=int, nargs="+", help="seeds")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="+", help="base config files, then key=value overrides")
    parser.add_argument("--out", required=True, type=Path, help="the sweep's folder")
    parser.add_argument("--local", action="store_true", help="run every run here, in turn")


def build(options: argparse.Namespace, points: list[dict[str, Any]], job_name: str) -> Path:
    """Write the sweep's runs for `points`; exits with a message naming the bad run."""
    files = [c for c in options.config if "=" not in c]
    overrides = [c for c in options.config if "=" in c]
    try:
        base = load_base(files, overrides)
        configs = {}
        for point in points:
            name = run_name(point)
            try:
                configs[name] = point_config(base, point)
            except ConfigError as err:
                raise ConfigError(f"run {name}: {err}") from None
    except ConfigError as err:
        sys.exit(f"{Path(sys.argv[0]).name}: {err}")
    script = write_sweep(options.out, configs, job_name)
    print(f"{len(configs)} runs in {options.out}/runs; submit with: sbatch {script}")
    return script


def launch(options: argparse.Namespace) -> None:
    if options.local:
        failed = run_local(options.out)
        if failed:
            sys.exit(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_launch_arguments(parser)
    add_grid_arguments(parser)
    options = parser.parse_args(argv)
    points = grid(options)
    if points == [{}]:
        parser.error("nothing to sweep: give at least one of --width --depth --lr --tokens ...")
    build(options, points, job_name=f"strata-sweep-{options.out.name}")
    launch(options)


if __name__ == "__main__":
    main()
