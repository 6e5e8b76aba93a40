"""A sweep's folder: one `runs/NAME/run.yml` per run, `runs.txt` (array index -> run folder)
and `sweep.sbatch`, a SLURM array script running `deepy.py train.py run.yml` per index.
`--local` runs the same script for each index in turn, so both paths run the same commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIG = "run.yml"  # each run's whole config; its log_dir is `logs/` beside it
RUN_LIST = "runs.txt"
SCRIPT = "sweep.sbatch"

_SCRIPT = """#!/bin/bash
# {count} runs, one per array index (line index + 1 of {runs}):
#   sbatch {script}
# or one after another here: python tools/scaling/sweep.py ... --local
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --output={logs}/%x-%A_%a.out
set -euo pipefail
cd "${{STRATA_REPO:-{repo}}}"
if [[ -z ${{STRATA_PYTHON:-}} && -f .venv/bin/activate ]]; then source .venv/bin/activate; fi
run=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "{runs}")
echo "strata sweep: index ${{SLURM_ARRAY_TASK_ID}}: $run"
exec "${{STRATA_PYTHON:-python}}" -u deepy.py train.py "$run/{config}"
"""


def write_sweep(out: Path, configs: dict[str, dict], job_name: str) -> Path:
    """Write every run's config, the run list and the array script; returns the script."""
    out = out.resolve()
    folders = []
    for name, config in configs.items():
        folder = out / "runs" / name
        config = {**config, "log_dir": str(folder / "logs")}
        if "tensorboard_dir" in config:
            config["tensorboard_dir"] = str(folder / "tensorboard")
        if "save" in config:  # each run its own checkpoints, resumed on a requeue
            config["save"] = config["load"] = str(folder / "checkpoints")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))
        folders.append(str(folder))
    atomic_write_text(out / RUN_LIST, "".join(f"{folder}\n" for folder in folders))
    (out / "logs").mkdir(exist_ok=True)
    script = out / SCRIPT
    text = _SCRIPT.format(
        count=len(folders),
        last=len(folders) - 1,
        runs=out / RUN_LIST,
        script=script,
        job_name=job_name,
        logs=out / "logs",
        repo=REPO,
        config=RUN_CONFIG,
    )
    atomic_write_text(script, text)
    return script


def run_local(out: Path) -> list[str]:
    """Run every index of the sweep's script here, one after another (output in each run's
    train.log); returns the folders of the runs that failed."""
    out = out.resolve()
    folders = (out / RUN_LIST).read_text().split()
    failed = []
    for index, folder in enumerate(folders):
        started = time.perf_counter()
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "STRATA_PYTHON": sys.executable}
        with open(Path(folder) / "train.log", "w") as log:
            status = subprocess.run(
                ["bash", str(out / SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        took = time.perf_counter() - started
        verdict = "ok" if status == 0 else f"FAILED (exit {status}; see {folder}/train.log)"
        print(f"run {index + 1}/{len(folders)} {Path(folder).name}: {verdict}, {took:.0f} s")
        if status != 0:
            failed.append(folder)
    return failed
