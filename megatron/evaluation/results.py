"""The results file (lm-evaluation-harness 0.4's JSON plus where the weights came from) and the
per-metric records for metrics.jsonl, TensorBoard and W&B."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megatron.utils import atomic_write_text


def results_path(prefix: str, now: float | None = None) -> Path:
    """`{prefix}_eval_results_{timestamp}.json` (`eval_results_{timestamp}.json` without one)."""
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.localtime(now))
    name = f"eval_results_{stamp}.json"
    return Path(f"{prefix}_{name}" if prefix else name)


def write_results(path: Path, results: dict[str, Any]) -> None:
    """The whole file at once (temporary name, then rename); values JSON cannot hold (the
    tasks' functions) are written as the harness writes them."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def metric_records(results: dict[str, Any], iteration: int) -> list[dict[str, Any]]:
    """One record per task and metric: value and standard error (the harness's "acc,none" and
    "acc_stderr,none" keys; the filter, "none" here, is kept in its own field)."""
    records = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            records.append(
                {
                    "iteration": iteration,
                    "split": "eval",
                    "task": task,
                    "metric": metric,
                    "filter": filter_name,
                    "value": value,
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                }
            )
    return records
