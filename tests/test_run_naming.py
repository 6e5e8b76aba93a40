"""W&B runs that name themselves: the wandb_run_name template, tags and notes, and the offline
fallback when W&B cannot log in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _config_fixtures import small_config
from conftest import REPO

from megatron.config import ConfigError, NeoXArgs
from megatron.run_naming import run_name

SLURM = {"SLURM_CLUSTER_NAME": "frontier", "SLURM_JOB_ID": "4242", "USER": "ada"}


def test_the_template_takes_config_keys_slurm_variables_and_the_config_file_name(tmp_path):
    template = "{experiment}_{cluster}_{job_id}_{user}_h{hidden_size}"
    args = NeoXArgs.from_dict(small_config(wandb_run_name=template))
    args.config_files = {"125M.yml": "", "local_setup.yml": ""}
    assert run_name(args, SLURM) == "125M_frontier_4242_ada_h64"
    array = {**SLURM, "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_name(args, array) == "125M_frontier_77_3_ada_h64"
    assert run_name(args, {}) == "125M_local_local_user_h64"
    profiled = {**SLURM, "STRATA_CLUSTER": "gh200-slingshot"}  # set by tools/slurm's scripts
    assert run_name(args, profiled) == "125M_gh200-slingshot_4242_ada_h64"
    assert run_name(NeoXArgs.from_dict(small_config()), SLURM) is None


@pytest.mark.parametrize("template", ["{experiment}_{clustr}", "{experiment"])
def test_a_bad_template_is_a_config_error(template):
    with pytest.raises(ConfigError, match="wandb_run_name"):
        NeoXArgs.from_dict(small_config(wandb_run_name=template))


# In a subprocess: W&B's process-wide setup reads the environment once.
OFFLINE_SCRIPT = """
import json, sys
from types import SimpleNamespace
from megatron.logging import MetricsLogger
args = SimpleNamespace(
    use_wandb=True, wandb_project="strata-test", wandb_group=None, wandb_team=None,
    wandb_host="https://api.wandb.ai", wandb_init_all_ranks=False,
    wandb_run_name="{experiment}_{cluster}_{job_id}", wandb_tags=["sweep", "125M"],
    wandb_notes="a note", config_files={"125M.yml": ""}, log_dir=sys.argv[1],
    tensorboard_dir=None,
)
logger = MetricsLogger(args)
run = logger.wandb
print(json.dumps([run.settings.mode, run.name, list(run.tags), run.notes]))
logger.log({"iteration": 1, "split": "train", "lm_loss": 1.0})
logger.close()
"""


def test_without_a_login_wandb_falls_back_to_offline(tmp_path: Path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "HOME"):
        env[name] = str(tmp_path / "home")
    env.update(SLURM, PYTHONPATH=str(REPO))
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(logs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    mode, name, tags, notes = json.loads(result.stdout.strip().splitlines()[-1])
    assert (mode, name, tags, notes) == (
        "offline",
        "125M_frontier_4242",
        ["sweep", "125M"],
        "a note",
    )
    assert "W&B could not start online" in result.stderr and "logging offline" in result.stderr
    assert list(logs.rglob("*.wandb"))
