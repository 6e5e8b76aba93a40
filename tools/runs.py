"""What a training run's files say about it, for tools/monitor.py and tools/plot_metrics.py.

A run is named by its log folder (`log_dir`, holding metrics.jsonl and run.json), by a folder
above it, by its metrics.jsonl, or by the job's log file (SLURM's `%x-%j.out`); the other
files are found from the one given where they can be.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # megatron/logging.py writes it; this module reads it without torch


@dataclass
class RunFiles:
    name: str
    metrics: Path | None = None
    info: Path | None = None
    log: Path | None = None
    job_id: str | None = None


def locate(target: str | Path) -> RunFiles:
    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder, metrics file or log")
    if path.is_dir():
        candidates = [path / METRICS_FILE, *sorted(path.rglob(METRICS_FILE))]
        found = next((p for p in candidates if p.is_file()), None)
        folder = found.parent if found else path
        info = folder / RUN_FILE if (folder / RUN_FILE).is_file() else None
        logs = sorted(path.glob("*.out"), key=lambda p: p.stat().st_mtime)
        # The training job's own log when run.json names the job (other jobs may log here too).
        job = read_info(info).get("job_id")
        log = next(
            (p for p in logs if job and job_id_of(p) == str(job)), logs[-1] if logs else None
        )
        return RunFiles(
            name=str(path),
            metrics=found,
            info=info,
            log=log,
            job_id=job_id_of(log) if log else None,
        )
    if path.name.endswith(".jsonl"):
        info = path.parent / RUN_FILE
        return RunFiles(str(path), metrics=path, info=info if info.is_file() else None)
    return RunFiles(str(path), log=path, job_id=job_id_of(path))


def job_id_of(log: Path) -> str | None:
    """SLURM's job id from a log named like `%x-%j.out` (or `slurm-%j.out`)."""
    match = re.search(r"-(\d+)(?:_\d+)?\.(?:out|log|err)$", log.name)
    return match.group(1) if match else None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line still being written (no newline yet) is left out."""
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from err
    return records


def read_info(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # replaced as we read it: the next look sees the new one
