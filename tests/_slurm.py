"""A real one-node SLURM cluster on this machine for the job-script tests: munged, slurmctld and
slurmd from Debian's slurm-wlm, with their own config, key, ports and state in a temporary
folder, stopped by pid afterwards. `.ci/run` installs the packages; without them the tests skip
and say why."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron.utils import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")


def missing_commands() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _config(folder: Path, user: str, host: str, munge_socket: Path) -> str:
    return f"""ClusterName=strata-test
SlurmctldHost={host}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def local_slurm(folder: Path) -> Iterator[dict[str, str]]:
    """Start the cluster; yields the environment SLURM's commands need (SLURM_CONF)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(exist_ok=True)
    munge = folder / "munge"
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    host = socket.gethostname().split(".")[0]
    conf.write_text(_config(folder, getpass.getuser(), host, munge / "munge.sock"))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = [munge / "munged.pid", folder / "slurmctld.pid", folder / "slurmd.pid"]
    try:
        subprocess.run(
            [
                "munged", "--force",
                f"--socket={munge / 'munge.sock'}", f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            ],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        subprocess.run(["slurmctld"], check=True, env=env, capture_output=True)
        subprocess.run(["slurmd"], check=True, env=env, capture_output=True)
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            if time.monotonic() > deadline:
                logs = "".join(
                    (folder / name).read_text()[-2000:]
                    for name in ("slurmctld.log", "slurmd.log")
                    if (folder / name).exists()
                )
                raise RuntimeError(f"the local SLURM node is {state!r}, not idle:\n{logs}")
            time.sleep(0.5)
        yield {"SLURM_CONF": str(conf)}
    finally:
        pids = [pid for pid in map(_pid, reversed(pid_files)) if pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a daemon whose parent does not reap it stays a zombie: exited all the same
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_job(job_id: str, env: dict[str, str], timeout: float = 600) -> str:
    """The job's final state (COMPLETED, FAILED, ...), polling scontrol."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(
            ["scontrol", "show", "job", job_id],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        ).stdout
        state = next(
            (part.split("=", 1)[1] for part in shown.split() if part.startswith("JobState=")), ""
        )
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not end within {timeout} s")
