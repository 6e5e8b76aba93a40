#!/usr/bin/env python
"""Where training runs stand: state, progress, losses, speed, ETA, the newest checkpoint, the job.

    python tools/monitor.py RUN_OR_LOG [...] [--json] [--watch SECONDS] [--stale-minutes M]

RUN_OR_LOG is a run's log folder (or a folder above it), its metrics.jsonl, or the job's log
file. States: PENDING (queued, or nothing written yet), RUNNING, COMPLETED, CRASHED (with the
last lines of the traceback or error), STALE (no file has moved for --stale-minutes), NAN (the
last training loss is not finite), STOPPED (ended before train_iters: exit_interval or a
preemption save). With SLURM's squeue/sacct/scontrol on PATH the job's id and state are shown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.runs import RunFiles, locate, read_info, read_metrics

# A console line of megatron/logging.py: "iter     12/100 | train | loss 5.1234 | ..."
CONSOLE_LINE = re.compile(r"iter\s+(\d+)/(\d+)\s+\|\s+(\w+)\s+\|\s+loss\s+(\S+)(.*)")
SAVED_LINE = re.compile(r"(?:saved|writing) checkpoint (\S+)")
FAILED_JOB_STATES = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
QUEUED_JOB_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED"}
ERROR_TAIL = 6
ERROR_BLOCK = re.compile(r"Traceback \(most recent call last\)|deepy\.py: configuration error")


@dataclass
class Status:
    run: str
    state: str = "PENDING"
    iteration: int | None = None
    train_iters: int | None = None
    percent: float | None = None
    last_loss: float | None = None
    last_valid_loss: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    latest_checkpoint: str | None = None
    job_id: str | None = None
    job_state: str | None = None
    seconds_since_update: float | None = None
    error: list[str] = field(default_factory=list)


def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from squeue (queued or running), else sacct, else scontrol."""
    state = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if not state:
        state = (_run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]) or "").strip()
    if not state:
        shown = _run(["scontrol", "show", "job", job_id]) or ""
        match = re.search(r"JobState=(\w+)", shown)
        state = match.group(1) if match else ""
    return state.split()[0].split("\n")[0] if state else None


def _float(text: str) -> float:
    return float(text.replace(",", ""))


def _from_metrics(records: list[dict], status: Status) -> None:
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    if train:
        last = train[-1]
        status.iteration = last["iteration"]
        status.last_loss = last.get("lm_loss")
        status.tokens_per_sec = last.get("tokens_per_sec")
        status.mfu = last.get("mfu")
        # ETA from the pace between the last two logged steps (of this job: times increase).
        if len(train) > 1 and status.train_iters and "time" in last and "time" in train[-2]:
            steps = last["iteration"] - train[-2]["iteration"]
            seconds = last["time"] - train[-2]["time"]
            if steps > 0 and seconds > 0:
                remaining = max(status.train_iters - last["iteration"], 0)
                status.eta_seconds = seconds / steps * remaining
    if valid:
        status.last_valid_loss = valid[-1].get("lm_loss")


def _from_log(text: str, status: Status, progress: bool) -> None:
    """The checkpoints and errors the log reports, and (`progress`: there is no metrics file)
    the progress its console lines show."""
    for line in text.splitlines():
        saved = SAVED_LINE.search(line)
        if saved:
            status.latest_checkpoint = saved.group(1)
        match = CONSOLE_LINE.search(line)
        if not (match and progress):
            continue
        iteration, total, split, loss, rest = match.groups()
        status.train_iters = status.train_iters or int(total)
        if split == "valid":
            status.last_valid_loss = _float(loss)
        elif split == "train":
            status.iteration, status.last_loss = int(iteration), _float(loss)
            speed = re.search(r"tok/s ([\d,.]+)", rest)
            status.tokens_per_sec = _float(speed.group(1)) if speed else None
    status.error = error_lines(text)


def error_lines(text: str) -> list[str]:
    """The last lines of the last traceback or of deepy.py's configuration errors, or the entry
    points' "error: ..." lines."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if ERROR_BLOCK.search(line)]
    if starts:
        tail = [line for line in lines[starts[-1] :] if line.strip()]
        return tail[-ERROR_TAIL:]
    errors = [line for line in lines if re.match(r"^(\[\S+\]\s*)?error: ", line.strip())]
    return errors[-ERROR_TAIL:]


def _latest_checkpoint(save: str | None) -> str | None:
    if not save:
        return None
    latest = Path(save) / "latest"
    try:
        return str(Path(save) / latest.read_text().strip())
    except OSError:
        return None


def _process_gone(info: dict) -> bool:
    """This machine's training process has exited (only knowable where it ran)."""
    if info.get("host") != socket.gethostname() or not info.get("pid"):
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def status_of(files: RunFiles, stale_minutes: float, now: float | None = None) -> Status:
    now = time.time() if now is None else now
    info = read_info(files.info)
    status = Status(run=files.name, job_id=info.get("job_id") or files.job_id)
    status.train_iters = info.get("train_iters")
    if files.metrics:
        _from_metrics(read_metrics(files.metrics), status)
    if files.log:
        _from_log(files.log.read_text(errors="replace"), status, progress=files.metrics is None)
    status.latest_checkpoint = _latest_checkpoint(info.get("save")) or status.latest_checkpoint
    if status.iteration is not None and status.train_iters:
        status.percent = round(100.0 * status.iteration / status.train_iters, 1)
    if status.job_id:
        status.job_state = slurm_job_state(status.job_id)
    touched = [p.stat().st_mtime for p in (files.metrics, files.log, files.info) if p]
    if touched:
        status.seconds_since_update = round(now - max(touched), 1)
    status.state = _state(status, info, stale_minutes)
    return status


def _state(status: Status, info: dict, stale_minutes: float) -> str:
    job = status.job_state or ""
    ended = info.get("state")
    done = status.iteration is not None and status.iteration >= (status.train_iters or math.inf)
    if job in QUEUED_JOB_STATES:
        return "PENDING"
    # Without run.json (a job log alone) reaching train_iters is the best sign of the end.
    if ended == "finished" or (not info and done and not status.error):
        return "COMPLETED"
    if ended == "stopped":
        return "STOPPED"
    if status.error or job in FAILED_JOB_STATES:
        return "CRASHED"
    if status.last_loss is not None and not math.isfinite(status.last_loss):
        return "NAN"
    if job == "COMPLETED" or _process_gone(info):
        status.error = status.error or ["the training process exited before the run finished"]
        return "CRASHED"
    if status.seconds_since_update is None:
        return "PENDING"
    if status.seconds_since_update > stale_minutes * 60:
        return "STALE"
    return "RUNNING"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def render(status: Status) -> str:
    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    progress = (
        f"{status.iteration}/{status.train_iters} ({status.percent}%)"
        if status.percent is not None
        else f"{number(status.iteration, 'd')}/{number(status.train_iters, 'd')}"
    )
    job = f" job {status.job_id} {status.job_state or ''}".rstrip() if status.job_id else ""
    lines = [
        f"{status.run}: {status.state}{job}",
        f"  iteration {progress} | loss {number(status.last_loss, '.4f')} | valid "
        f"{number(status.last_valid_loss, '.4f')} | tok/s {number(status.tokens_per_sec, ',.0f')}"
        f" | mfu {number(status.mfu, '.1%')} | eta {format_seconds(status.eta_seconds)}",
        f"  checkpoint {status.latest_checkpoint or '-'} | updated "
        f"{format_seconds(status.seconds_since_update)} ago",
    ]
    lines += [f"  | {line}" for line in status.error if status.state == "CRASHED"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run log folders, metrics.jsonl files or job logs")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    parser.add_argument("--stale-minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        runs = [locate(target) for target in args.runs]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    while True:
        statuses = [status_of(run, args.stale_minutes) for run in runs]
        if args.watch and not args.json:
            print("\033[2J\033[H", end="")
        for status in statuses:
            print(json.dumps(asdict(status)) if args.json else render(status), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
