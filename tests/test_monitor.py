"""tools/monitor.py and tools/plot_metrics.py on the files of a real training run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _config_fixtures import small_config, write_config
from conftest import run_tool

from tools.monitor import status_of
from tools.runs import locate, read_metrics

pytestmark = pytest.mark.timeout(600)
TRAIN_ITERS = 6


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_dataset: str) -> Path:
    """One real run to its end; its console output saved as the job log `train.out`."""
    run = tmp_path_factory.mktemp("finished")
    values = small_config(
        text_dataset,
        train_iters=TRAIN_ITERS,
        log_interval=1,
        eval_interval=3,
        eval_iters=1,
        log_dir=str(run / "logs"),
        save=str(run / "ckpt"),
        checkpoint_factor=3,
        split="90,10,0",
    )
    result = run_tool("deepy.py", "train.py", write_config(run / "config.yml", values))
    (run / "train.out").write_text(result.stdout + result.stderr)
    return run


def monitor(*argv: str) -> subprocess.CompletedProcess:
    return run_tool("tools/monitor.py", *argv, check=False)


def copy_run(finished: Path, target: Path, state: str, pid: int) -> Path:
    """The run's files as they looked while it ran (run.json `running`, process `pid`)."""
    shutil.copytree(finished / "logs", target / "logs")
    info = json.loads((target / "logs" / "run.json").read_text())
    (target / "logs" / "run.json").write_text(json.dumps({**info, "state": state, "pid": pid}))
    return target


def test_a_finished_run_is_completed_with_its_figures(finished: Path) -> None:
    result = monitor(str(finished), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    records = read_metrics(finished / "logs" / "metrics.jsonl")
    last_train = [r for r in records if r["split"] == "train"][-1]
    assert status["state"] == "COMPLETED"
    assert (status["iteration"], status["train_iters"]) == (TRAIN_ITERS, TRAIN_ITERS)
    assert status["last_loss"] == last_train["lm_loss"]
    assert status["tokens_per_sec"] == last_train["tokens_per_sec"]
    assert status["eta_seconds"] == 0.0
    assert status["latest_checkpoint"] == str(finished / "ckpt" / f"global_step{TRAIN_ITERS}")
    assert {"job_id", "state", "iteration", "train_iters", "last_loss"} <= status.keys()
    table = monitor(str(finished / "logs" / "metrics.jsonl")).stdout
    assert "COMPLETED" in table and f"iteration {TRAIN_ITERS}/{TRAIN_ITERS} (100.0%)" in table


def test_the_job_log_alone_gives_progress_and_checkpoints(finished: Path) -> None:
    status = status_of(locate(finished / "train.out"), stale_minutes=10)
    assert (status.iteration, status.train_iters, status.state) == (6, 6, "COMPLETED")
    assert status.latest_checkpoint == str(finished / "ckpt" / "global_step6")
    assert math.isfinite(status.last_loss) and status.tokens_per_sec > 0


def test_running_stale_and_crashed(finished: Path, tmp_path: Path) -> None:
    live = copy_run(finished, tmp_path / "live", "running", os.getpid())
    (live / "logs" / "run.json").touch()
    assert status_of(locate(live), stale_minutes=10).state == "RUNNING"
    later = os.path.getmtime(live / "logs" / "run.json") + 11 * 60
    assert status_of(locate(live), stale_minutes=10, now=later).state == "STALE"
    stopped = copy_run(finished, tmp_path / "stopped", "stopped", os.getpid())
    assert status_of(locate(stopped), stale_minutes=10, now=later).state == "STOPPED"

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = copy_run(finished, tmp_path / "dead", "running", gone.pid)
    with open(dead / "logs" / "metrics.jsonl") as handle:
        lines = handle.readlines()
    (dead / "logs" / "metrics.jsonl").write_text("".join(lines[:3]))
    status = status_of(locate(dead), stale_minutes=10)
    assert status.state == "CRASHED" and status.iteration < TRAIN_ITERS
    assert status.error == ["the training process exited before the run finished"]


def test_a_non_finite_loss_is_nan(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "nan", "running", os.getpid())
    metrics = run / "logs" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records = [r for r in records if r["iteration"] < 4]
    records.append({**records[-1], "iteration": 4, "split": "train", "lm_loss": math.nan})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    status = status_of(locate(run), stale_minutes=10)
    assert (status.state, status.iteration) == ("NAN", 4)


def test_a_config_that_breaks_at_start_is_crashed_with_its_error(
    tmp_path: Path, text_dataset: str
) -> None:
    config = write_config(tmp_path / "bad.yml", small_config(text_dataset, hidden_size=30))
    result = run_tool("deepy.py", "train.py", config, check=False)
    assert result.returncode != 0
    log = tmp_path / "bad.out"
    log.write_text(result.stdout + result.stderr)
    table = monitor(str(log))
    assert table.returncode == 0
    assert "CRASHED" in table.stdout and "hidden_size" in table.stdout


def test_a_queued_job_is_pending_with_its_slurm_state(tmp_path: Path, monkeypatch) -> None:
    """squeue answers for the job named in the log's file name (`%x-%j.out`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text('#!/bin/sh\n[ "$3" = 4242 ] && echo PENDING\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "pretrain-4242.out"
    log.write_text("")
    status = status_of(locate(log), stale_minutes=10)
    assert (status.state, status.job_id, status.job_state) == ("PENDING", "4242", "PENDING")


def test_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    result = monitor(str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert f"error: {tmp_path / 'nowhere'}: no such run folder" in result.stderr


def test_plot_overlays_runs(finished: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "metrics.jsonl"
    other.parent.mkdir()
    records = read_metrics(finished / "logs" / "metrics.jsonl")
    other.write_text(
        "".join(json.dumps({**r, "lm_loss": r["lm_loss"] / 2}) + "\n" for r in records)
    )
    output = tmp_path / "plots" / "loss.png"
    result = run_tool(
        "tools/plot_metrics.py",
        str(finished),
        str(other),
        "--labels",
        "base,half",
        "--output",
        str(output),
        "--x",
        "tokens",
    )
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_points = sum(1 for r in records if r["split"] == "train")
    assert "2 run(s)" in result.stdout
    from tools.plot_metrics import plot

    drawn = plot({"base": records}, tmp_path / "one.png")
    assert drawn["loss"] == {"base": train_points}
    assert drawn["valid loss"]["base"] == sum(1 for r in records if r["split"] == "valid")


def test_plot_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    result = run_tool("tools/plot_metrics.py", str(tmp_path), "--output", "x.png", check=False)
    assert result.returncode == 1
    assert "no metrics.jsonl in or below it" in result.stderr
