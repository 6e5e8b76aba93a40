#!/usr/bin/env python
"""Training curves of one or more runs, overlaid: train and valid loss, learning rate, tokens/s
and gradient norm against iteration (or tokens seen).

    python tools/plot_metrics.py RUN [RUN ...] --output loss.png [--x tokens] [--labels a,b]

RUN is what tools/monitor.py takes: a run's log folder, a folder above it, or its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.cli import exit_status
from tools.runs import locate, read_metrics

# (panel title, split, metric key)
PANELS = (
    ("loss", "train", "lm_loss"),
    ("valid loss", "valid", "lm_loss"),
    ("learning rate", "train", "lr"),
    ("tokens/s", "train", "tokens_per_sec"),
    ("gradient norm", "train", "grad_norm"),
)
X_KEYS = {"iteration": "iteration", "tokens": "consumed_tokens"}


def series(records: list[dict], split: str, key: str, x_key: str) -> tuple[list, list]:
    """(x, y) of one metric; a requeued run's repeated iterations keep their last value."""
    points = {r[x_key]: r[key] for r in records if r.get("split") == split and key in r}
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def plot(runs: dict[str, list[dict]], output: Path, x: str = "iteration") -> dict:
    """Draw the panels to `output`; returns {panel: {run: number of points}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(PANELS), 1, figsize=(8, 3 * len(PANELS)), sharex=True)
    drawn: dict[str, dict[str, int]] = {}
    for axis, (title, split, key) in zip(axes, PANELS):
        drawn[title] = {}
        for name, records in runs.items():
            xs, ys = series(records, split, key, X_KEYS[x])
            if xs:
                axis.plot(xs, ys, label=name, marker="." if len(xs) < 50 else None)
                drawn[title][name] = len(xs)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if key == "lm_loss" and drawn[title]:
            axis.legend(fontsize="small")
    axes[-1].set_xlabel("tokens" if x == "tokens" else "iteration")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{output.suffix}")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(output)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run log folders or metrics.jsonl files")
    parser.add_argument("--output", type=Path, required=True, help="image file (.png, .pdf, .svg)")
    parser.add_argument("--x", choices=sorted(X_KEYS), default="iteration")
    parser.add_argument("--labels", help="comma-separated names for the runs, in order")
    args = parser.parse_args(argv)

    def work() -> None:
        labels = args.labels.split(",") if args.labels else args.runs
        if len(labels) != len(args.runs):
            raise ValueError(f"--labels names {len(labels)} runs but {len(args.runs)} are given")
        runs = {}
        for label, target in zip(labels, args.runs):
            files = locate(target)
            if files.metrics is None:
                raise FileNotFoundError(f"{target}: no metrics.jsonl in or below it")
            runs[label] = read_metrics(files.metrics)
        drawn = plot(runs, args.output, args.x)
        points = sum(sum(counts.values()) for counts in drawn.values())
        print(f"wrote {args.output}: {len(runs)} run(s), {points} points")

    return exit_status(work, (FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
