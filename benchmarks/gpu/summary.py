"""One line per size and mode from train_throughput.py's JSON (the device run prints it last).

python benchmarks/gpu/summary.py train_throughput.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(report: dict) -> list[str]:
    lines = [f"{report['device']}  matmul {report['matmul_bf16_tflops_8192']} TFLOP/s"]
    lines.append(
        f"{'size':<6} {'mode':<13} {'mb':>4} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}"
    )
    for size, entry in report["sizes"].items():
        if "skipped" in entry:
            lines.append(f"{size:<6} skipped: {entry['skipped']}")
            continue
        results = dict(entry["strata"].get("modes", {}))
        if "error" in entry["strata"]:
            lines.append(f"{size:<6} error: {entry['strata']['error']}")
        if "hf_transformers" in entry:
            results["hf peer"] = entry["hf_transformers"]
        for mode, r in results.items():
            if "tokens_per_sec" not in r:
                lines.append(f"{size:<6} {mode:<13} {r.get('skipped') or r.get('error')}")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            lines.append(
                f"{size:<6} {mode:<13} {r['micro_batch']:>4} {r['tokens_per_sec']:>10,.0f} "
                f"{r['tflops']:>8.1f} {mfu:>6} {r['peak_memory_gib']:>6.1f}"
            )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(rows(json.loads(Path(argv[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
