"""Find a learning rate: K short runs over a log-spaced range, the best by validation loss, and a
parabola in log(lr) through the best and its neighbours for the optimum between the points.

    python tools/scaling/lr_sweep.py run CONFIG.yml [key=value ...] --out sweeps/lr \\
        --lr-min 1e-4 --lr-max 1e-2 [--points 7] [--seed 1 2] [--local]
    python tools/scaling/lr_sweep.py analyse sweeps/lr [--json lr.json] [--plot lr.png]

`run` writes the runs and `sweep.sbatch` (a SLURM array) as sweep.py does; with `--local` it runs
them here and analyses them. `analyse` reads finished runs (seeds are averaged per learning rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.utils import atomic_write_text  # noqa: E402
from tools.scaling import collect, sweep  # noqa: E402

NEIGHBOURS = 2  # points each side of the best that the parabola is fitted to


def parabola_optimum(lrs, losses) -> dict | None:
    """The vertex of loss = a log(lr)^2 + b log(lr) + c fitted to the best point and up to
    NEIGHBOURS points each side; None unless it is a minimum inside those points."""
    order = np.argsort(lrs)
    lrs, losses = np.asarray(lrs, float)[order], np.asarray(losses, float)[order]
    best = int(np.argmin(losses))
    near = slice(max(0, best - NEIGHBOURS), best + NEIGHBOURS + 1)
    x, y = np.log(lrs[near]), losses[near]
    if len(x) < 3:
        return None
    curve = np.polyfit(x, y, 2)
    if curve[0] <= 0:
        return None
    vertex = -curve[1] / (2 * curve[0])
    if not x.min() <= vertex <= x.max():
        return None
    return {
        "lr": float(math.exp(vertex)),
        "loss": float(np.polyval(curve, vertex)),
        "coefficients": [float(c) for c in curve],
        "fitted_range": [float(lrs[near][0]), float(lrs[near][-1])],
    }


def analyse(folder: Path, json_path: Path | None, plot: str | None) -> dict:
    by_lr: dict[float, list[float]] = defaultdict(list)
    for run in collect.find_runs([folder]):
        row = collect.row(run)
        if row["loss"] == "" or not math.isfinite(row["loss"]):
            print(f"lr_sweep.py: {run.name}: no finite validation loss; left out", file=sys.stderr)
            continue
        by_lr[row["lr"]].append(row["loss"])
    if len(by_lr) < 3:
        raise collect.RunError(
            f"{folder}: {len(by_lr)} learning rates with a validation loss; the parabola needs 3"
        )
    lrs = sorted(by_lr)
    losses = [float(np.mean(by_lr[lr])) for lr in lrs]
    best = int(np.argmin(losses))
    optimum = parabola_optimum(lrs, losses)
    result = {
        "runs": [
            {"lr": lr, "loss": loss, "seeds": len(by_lr[lr])} for lr, loss in zip(lrs, losses)
        ],
        "best": {"lr": lrs[best], "loss": losses[best]},
        "optimum": optimum,
    }
    if optimum is None:
        edge = "lowest" if best == 0 else "highest" if best == len(lrs) - 1 else "a noisy"
        result["note"] = f"no parabola minimum: the best is the {edge} point; widen the range"
    text = json.dumps(result, indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, text + "\n")
    print(text)
    if plot:
        from tools.scaling import plots

        plots.lr_curve(plot, lrs, losses, optimum)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="write the runs (and with --local, run and analyse)")
    sweep.add_launch_arguments(run)
    run.add_argument("--lr-min", type=float, required=True)
    run.add_argument("--lr-max", type=float, required=True)
    run.add_argument("--points", type=int, default=7, help="learning rates, log-spaced")
    run.add_argument("--seed", type=int, nargs="+", help="seeds (averaged per learning rate)")
    for command in (run, commands.add_parser("analyse", help="the best lr of finished runs")):
        command.add_argument("--json", type=Path, help="write the result here")
        command.add_argument("--plot", help="write the loss-vs-lr figure here (.png)")
    commands.choices["analyse"].add_argument("out", type=Path, help="the sweep's folder")
    options = parser.parse_args(argv)
    if options.command == "run":
        if not 0 < options.lr_min < options.lr_max or options.points < 3:
            parser.error("expected 0 < --lr-min < --lr-max and --points >= 3")
        lrs = np.geomspace(options.lr_min, options.lr_max, options.points)
        points = [
            {"lr": float(f"{lr:.4g}"), **({"seed": seed} if seed is not None else {})}
            for lr in lrs
            for seed in options.seed or [None]
        ]
        sweep.build(options, points, job_name=f"strata-lr-{options.out.name}")
        sweep.launch(options)
        if not options.local:
            return 0
    try:
        analyse(options.out, options.json, options.plot)
    except collect.RunError as err:
        print(f"lr_sweep.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
