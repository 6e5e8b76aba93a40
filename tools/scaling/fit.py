"""Fit a Chinchilla scaling law to runs (approach 3) and, where the runs allow, iso-FLOP minima.

    python tools/scaling/fit.py --input runs.csv [--compute 1e21 ...] [--json fit.json]
        [--plot figures/law] [--bootstrap 100] [--params-column params]

`runs.csv` needs the columns `params`, `tokens` and `loss` (tools/scaling/collect.py writes it).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.utils import atomic_write_text  # noqa: E402
from tools.scaling import law as laws  # noqa: E402

FIELDS = ("E", "A", "B", "alpha", "beta")


class InputError(ValueError):
    pass


def read_runs(path: Path, params_column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) from the CSV; a missing column or a value that is not a positive number is an
    error naming the file, the row and the column."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if not rows:
        raise InputError(f"{path}: no runs (expected a header line, then one row per run)")
    columns = (params_column, "tokens", "loss")
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{path}: expected the columns {', '.join(columns)}; missing {missing}")
    values = np.zeros((len(rows), 3))
    for number, row in enumerate(rows, 2):  # row 1 is the header
        for j, column in enumerate(columns):
            try:
                values[number - 2, j] = float(row[column])
            except ValueError:
                values[number - 2, j] = np.nan
            if not values[number - 2, j] > 0:
                raise InputError(
                    f"{path}: row {number}, column {column!r}: expected a positive number, got "
                    f"{row[column]!r} (an unfinished run? drop its row)"
                )
    return values[:, 0], values[:, 1], values[:, 2]


def summarise(law: laws.Law, boot: list[laws.Law], computes: list[float]) -> dict:
    result: dict = law.as_dict()
    if boot:
        result["intervals"] = {
            key: laws.interval([getattr(b, key) for b in boot]) for key in FIELDS
        }
    result["optimal"] = []
    for compute in computes:
        entry = {"compute": compute, **law.optimal(compute)}
        if boot:
            samples = [b.optimal(compute) for b in boot]
            entry["intervals"] = {
                key: laws.interval([s[key] for s in samples])
                for key in ("params", "tokens", "loss")
            }
        result["optimal"].append(entry)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="runs.csv (collect.py)")
    parser.add_argument("--compute", type=float, nargs="*", default=[], help="FLOP budgets")
    parser.add_argument("--json", type=Path, help="write the fit here")
    parser.add_argument("--plot", help="write PREFIX-contours.png and PREFIX-compute.png")
    parser.add_argument("--bootstrap", type=int, default=100, help="resamples (0: none)")
    parser.add_argument(
        "--starts",
        type=int,
        default=laws.DEFAULT_STARTS,
        help="L-BFGS from this many of the 4500 grid starts, the best first (0: all)",
    )
    parser.add_argument(
        "--params-column", default="params", help="N: params (total) or params_non_embedding"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    try:
        params, tokens, loss = read_runs(args.input, args.params_column)
    except InputError as err:
        print(f"fit.py: {err}", file=sys.stderr)
        return 2
    if len(params) < 5:
        print(
            f"fit.py: warning: {len(params)} runs for 5 parameters: the law is underdetermined",
            file=sys.stderr,
        )
    law = laws.fit(params, tokens, loss, starts=args.starts or None)
    boot = laws.bootstrap(params, tokens, loss, law, args.bootstrap, seed=args.seed)
    result = {
        "runs": len(params),
        "params_column": args.params_column,
        "bootstrap": args.bootstrap,
        **summarise(law, boot, args.compute),
        "isoflop": laws.isoflop_minima(params, tokens, loss),
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, text + "\n")
    print(text)
    if args.plot:
        from tools.scaling import plots

        plots.law_contours(f"{args.plot}-contours.png", law, params, tokens, loss, args.compute)
        plots.loss_vs_compute(f"{args.plot}-compute.png", law, params, tokens, loss, args.compute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
