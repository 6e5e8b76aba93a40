"""The job life-cycle on a real one-node SLURM cluster (tests/_slurm.py): pretrain.sbatch trains
to the end, a preempted job saves, requeues itself and finishes with the losses of an
uninterrupted run, the monitor follows, a broken config is CRASHED; the submitter's choice of
cluster and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from _config_fixtures import small_config, write_config
from _slurm import local_slurm, missing_commands, wait_for_job
from conftest import REPO, run_tool

from tools.monitor import status_of
from tools.runs import locate

pytestmark = pytest.mark.timeout(900)
TRAIN_ITERS = 40


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    missing = missing_commands()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs it)")
    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def submit(slurm: dict, run: Path, config: str, *extra: str) -> str:
    """sbatch pretrain.sbatch as a user does (from the repository, the local profile)."""
    (run / "logs").mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            "sbatch", "--parsable", "--nodes=1", f"--output={run}/logs/%x-%j.out",
            "tools/slurm/pretrain.sbatch", config, *extra,
        ],
        cwd=REPO, env={**os.environ, **slurm, "STRATA_CLUSTER": "local"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip().split(";")[0]


def job_config(run: Path, data: str) -> str:
    values = small_config(
        data,
        train_iters=TRAIN_ITERS,
        log_interval=1,
        eval_interval=20,
        eval_iters=1,
        split="90,10,0",
        log_dir=str(run / "logs"),
        save=str(run / "ckpt"),
        load=str(run / "ckpt"),  # GPT-NeoX's setup: the first start finds nothing and begins
        checkpoint_factor=20,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
    )
    return write_config(run / "config.yml", values)


def train_losses(run: Path) -> dict[int, float]:
    """Train losses by iteration; a requeued job's repeated iterations keep their last value."""
    records = map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
    return {r["iteration"]: r["lm_loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, text_dataset) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    job = submit(slurm, run, job_config(run, text_dataset))
    seen = []
    while (state := status_of(locate(run / "logs"), stale_minutes=10).state) != "COMPLETED":
        seen.append(state)
        if state == "CRASHED" or len(seen) > 600:
            break
        time.sleep(0.5)
    assert wait_for_job(job, slurm) == "COMPLETED", (run / "logs").glob("*.out")
    run.joinpath("monitor-states.json").write_text(json.dumps(seen))
    return run


def test_pretrain_sbatch_trains_to_the_end_on_two_tasks(uninterrupted: Path) -> None:
    log = next((uninterrupted / "logs").glob("strata-pretrain-*.out")).read_text()
    assert "holds no checkpoint yet" in log  # load = save on the first start
    assert "cluster local" in log and "x 2 (data parallel)" in log
    assert sorted(train_losses(uninterrupted)) == list(range(1, TRAIN_ITERS + 1))
    assert (uninterrupted / "ckpt" / "latest").read_text() == f"global_step{TRAIN_ITERS}"


def test_the_monitor_follows_the_job(slurm, uninterrupted: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])  # scontrol reaches the test cluster
    seen = json.loads((uninterrupted / "monitor-states.json").read_text())
    assert "RUNNING" in seen and "CRASHED" not in seen
    status = status_of(locate(uninterrupted / "logs"), stale_minutes=10)
    assert (status.state, status.iteration) == ("COMPLETED", TRAIN_ITERS)
    assert status.job_id and status.job_state == "COMPLETED"


def test_a_preempted_job_saves_requeues_and_matches_the_uninterrupted_run(
    slurm, uninterrupted: Path, tmp_path: Path, text_dataset: str, monkeypatch
) -> None:
    """Submitted through tools/submit.py, with a job chained after it (as a conversion or an
    evaluation would be) that must wait for the requeued job's real end."""
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    run = tmp_path / "preempted"
    submitted = run_tool(
        "tools/submit.py", job_config(run, text_dataset), "--cluster", "local", "--nodes", "1",
        "--job-name", "strata-pretrain", "--log-dir", str(run / "logs"),
        "--then", "python tools/monitor.py {log_dir} --json > {save}/after.json",
    ).stdout  # fmt: skip
    job = submitted.split("submitted job ")[1].split()[0]
    after = submitted.split("submitted job ")[2].split()[0]
    metrics = run / "logs" / "metrics.jsonl"
    while not (metrics.exists() and len(train_losses(run)) >= 3):
        time.sleep(0.2)
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job], env={**os.environ, **slurm}, check=True
    )
    assert wait_for_job(job, slurm) == "COMPLETED"
    log = (run / "logs" / f"strata-pretrain-{job}.out").read_text()
    assert "requeueing job" in log and "start 2 " in log
    stopped_at = int(log.split("stopping after iteration ")[1].split()[0])
    assert 3 <= stopped_at < TRAIN_ITERS
    assert train_losses(run) == train_losses(uninterrupted)
    assert wait_for_job(after, slurm) == "COMPLETED"
    seen_after = json.loads((run / "ckpt" / "after.json").read_text())
    assert (seen_after["state"], seen_after["iteration"]) == ("COMPLETED", TRAIN_ITERS)


def test_a_config_that_breaks_at_start_is_a_crashed_job(slurm, tmp_path: Path) -> None:
    run = tmp_path / "broken"
    config = write_config(run / "config.yml", small_config(None, hidden_size=30))
    job = submit(slurm, run, config)
    assert wait_for_job(job, slurm) == "FAILED"
    status = status_of(locate(run / "logs"), stale_minutes=10)
    assert status.state == "CRASHED" and status.job_id == job
    assert any("hidden_size" in line for line in status.error)


# -- the submitter -------------------------------------------------------------------------------


def fake_profiles(tmp_path: Path, idle: dict[str, int | None]) -> Path:
    """Profiles whose sinfo is a script answering an idle-node count (None: unreachable)."""
    folder = tmp_path / "clusters"
    folder.mkdir()
    local = (REPO / "configs" / "clusters" / "local.yml").read_text()
    for name, count in idle.items():
        sinfo = tmp_path / f"sinfo-{name}"
        sinfo.write_text(
            f"#!/bin/sh\necho {count}\n" if count is not None else "#!/bin/sh\nexit 1\n"
        )
        sinfo.chmod(0o755)
        text = local.replace("sinfo: [sinfo]", f"sinfo: [{sinfo}]").replace(
            "partition: null", f"partition: p-{name}"
        )
        (folder / f"{name}.yml").write_text(text)
    return folder


def test_the_submitter_picks_the_cluster_that_starts_soonest(tmp_path: Path, monkeypatch) -> None:
    import tools.slurm.profiles as profiles
    from tools.submit import pick_cluster

    folder = fake_profiles(tmp_path, {"busy": 1, "free": 6, "down": None, "freer": 9})
    load = [profiles.load_profile(n, folder) for n in ("busy", "free", "down", "freer")]
    chosen, reasons = pick_cluster(load, nodes=4)
    assert chosen.name == "freer"
    assert reasons[:3] == [
        "busy: 1 idle node(s)",
        "free: 6 idle node(s)",
        "down: no answer from sinfo",
    ]
    assert reasons[-1] == "chose freer: 9 idle of 4 needed, can start now"
    chosen, reasons = pick_cluster(load[:2], nodes=8)
    assert chosen.name == "free" and "closest to starting" in reasons[-1]


def test_the_submitter_refuses_bad_input_before_the_queue(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yml", small_config(None, model_parallel_size=4))
    result = run_tool(
        "tools/submit.py", config, "--cluster", "local", "--nodes", "1", "--dry-run", check=False
    )
    assert result.returncode == 1
    assert "1 x 2 GPUs per node (local) = 2 processes" in result.stderr
    result = run_tool("tools/submit.py", config, "--cluster", "nope", check=False)
    assert "unknown cluster profile 'nope'" in result.stderr and "local" in result.stderr
    result = run_tool("tools/submit.py", "missing.yml", "--cluster", "local", check=False)
    assert "config file missing.yml does not exist" in result.stderr
    ok = run_tool(
        "tools/submit.py",
        "configs/quickstart.yml",
        "--cluster",
        "local",
        "--nodes",
        "1",
        "--dry-run",
    )
    assert (
        "#SBATCH --nodes=1" in ok.stdout and str(REPO / "configs" / "quickstart.yml") in ok.stdout
    )


def test_a_profile_missing_a_field_is_named(tmp_path: Path) -> None:
    from tools.slurm.profiles import ProfileError, load_profile

    folder = tmp_path / "clusters"
    folder.mkdir()
    text = (REPO / "configs" / "clusters" / "local.yml").read_text()
    (folder / "partial.yml").write_text(text.replace("gpus_per_node: 2", ""))
    with pytest.raises(ProfileError, match="partial.yml: the required field 'gpus_per_node'"):
        load_profile("partial", folder)


def test_every_shipped_profile_loads() -> None:
    from tools.slurm.profiles import known_profiles, load_profile

    names = known_profiles()
    assert {"local", "gh200-slingshot", "h100-infiniband"} <= set(names)
    slingshot = load_profile("gh200-slingshot")
    assert slingshot.env["NCCL_NET"] == "AWS Libfabric" and slingshot.env["FI_PROVIDER"] == "cxi"
    assert all(load_profile(name).gpus_per_node >= 1 for name in names)
