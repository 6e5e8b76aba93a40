"""One CSV row per training run, for fit.py and for your own plots.

    python tools/scaling/collect.py RUN_DIR [RUN_DIR ...] --output runs.csv

A RUN_DIR is a run's folder holding its `run.yml` (the whole config: sweep.py writes one per
run; for another run, copy its config there, with `log_dir` set), or any folder above such run
folders (a sweep's folder). The metrics come from `{log_dir}/metrics.jsonl`.

Columns: `params` (total) and `params_non_embedding` (without the input embedding and an untied
output layer), `tokens` (consumed), `flops` (6ND with the total params), `train_flops` (the
run's own count: dense weights, attention and logits), `loss` (the last validation loss; empty
when the run has none yet), `min_train_loss`, `last_train_loss`, `iterations`, `lr`, `width`,
`depth`, `optimizer`, `schedule`, `seed`.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megatron.config  # noqa: E402, F401  (every config rule registered)
from megatron.neox_arguments import ConfigError, NeoXArgs  # noqa: E402
from megatron.neox_arguments.sizes import parameter_counts  # noqa: E402
from megatron.utils import atomic_write_text  # noqa: E402
from tools.runs import METRICS_FILE, read_metrics  # noqa: E402
from tools.scaling.launch import RUN_CONFIG  # noqa: E402

COLUMNS = (
    "name",
    "params",
    "params_non_embedding",
    "tokens",
    "flops",
    "train_flops",
    "loss",
    "min_train_loss",
    "last_train_loss",
    "iterations",
    "lr",
    "width",
    "depth",
    "optimizer",
    "schedule",
    "seed",
    "run_dir",
)


class RunError(ValueError):
    pass


def find_runs(targets: list[Path]) -> list[Path]:
    """The run folders (holding run.yml) named by or under each target."""
    folders: list[Path] = []
    for target in targets:
        if not target.is_dir():
            raise RunError(f"{target}: no such folder")
        found = [target] if (target / RUN_CONFIG).is_file() else []
        found = found or sorted(p.parent for p in target.rglob(RUN_CONFIG))
        if not found:
            raise RunError(f"{target}: no {RUN_CONFIG} in it or below it (one per run)")
        folders.extend(found)
    return folders


def row(folder: Path) -> dict:
    try:
        args = NeoXArgs.from_ymls([folder / RUN_CONFIG])
    except ConfigError as err:
        raise RunError(f"{folder / RUN_CONFIG}: {err}") from None
    metrics_path = Path(args.log_dir or folder / "logs") / METRICS_FILE
    if not metrics_path.is_file():
        raise RunError(f"{metrics_path}: no metrics (has the run started? log_dir: {args.log_dir})")
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train" and not r.get("skipped")]
    if not train:
        raise RunError(f"{metrics_path}: no train records yet")
    valid = [r for r in records if r.get("split") == "valid"]
    if not valid:
        print(
            f"collect.py: warning: {metrics_path}: no valid records; `loss` left empty",
            file=sys.stderr,
        )
    counts = parameter_counts(args)
    last = train[-1]
    return {
        "name": folder.name,
        "params": counts["total"],
        "params_non_embedding": counts["total"] - counts["embedding"] - counts["output"],
        "tokens": last["consumed_tokens"],
        "flops": 6 * counts["total"] * last["consumed_tokens"],
        "train_flops": last.get("flops", ""),
        "loss": valid[-1]["lm_loss"] if valid else "",
        "min_train_loss": min(r["lm_loss"] for r in train),
        "last_train_loss": last["lm_loss"],
        "iterations": last["iteration"],
        "lr": args.lr,
        "width": args.hidden_size,
        "depth": args.num_layers,
        "optimizer": args.optimizer_type,
        "schedule": args.lr_decay_style,
        "seed": args.seed,
        "run_dir": str(folder),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders above them")
    parser.add_argument("--output", required=True, type=Path, help="the CSV to write")
    options = parser.parse_args(argv)
    try:
        rows = [row(folder) for folder in find_runs(options.runs)]
    except RunError as err:
        print(f"collect.py: {err}", file=sys.stderr)
        return 2
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(options.output, text.getvalue())
    print(f"{len(rows)} runs -> {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
