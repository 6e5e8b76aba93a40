"""Metrics sinks: which ranks start W&B, and on which host."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import megatron.logging as logging_module
from megatron.logging import MetricsLogger


def wandb_args(log_dir: Path, **settings) -> SimpleNamespace:
    values = dict(
        use_wandb=True,
        wandb_project="strata-test",
        wandb_group="job",
        wandb_team=None,
        wandb_host="https://api.wandb.ai",
        wandb_init_all_ranks=False,
        log_dir=str(log_dir),
        tensorboard_dir=None,
    )
    return SimpleNamespace(**{**values, **settings})


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))


def run_files(log_dir: Path) -> list[Path]:
    return list(log_dir.rglob("*.wandb"))


def test_other_ranks_start_wandb_only_with_wandb_init_all_ranks(
    tmp_path: Path, offline_wandb: None, monkeypatch
) -> None:
    monkeypatch.setattr(logging_module, "is_rank_0", lambda: False)
    quiet = MetricsLogger(wandb_args(tmp_path / "quiet"))
    assert quiet.wandb is None and not run_files(tmp_path)

    every = MetricsLogger(wandb_args(tmp_path / "all", wandb_init_all_ranks=True))
    assert every.wandb.name == "rank0"  # the runs of one job are named by rank
    every.log({"iteration": 1, "split": "train", "lm_loss": 1.0})  # rank 0 alone logs metrics
    every.close()
    assert every.jsonl is None and len(run_files(tmp_path / "all")) == 1


def test_wandb_host_reaches_the_run(tmp_path: Path, offline_wandb: None) -> None:
    host = "http://127.0.0.1:9"
    logger = MetricsLogger(wandb_args(tmp_path, wandb_host=host))
    assert logger.wandb.settings.base_url == host
    logger.close()


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, offline_wandb: None) -> None:
    logger = MetricsLogger(wandb_args(tmp_path), wandb_run_id="strata0resumed")
    assert logger.wandb.id == "strata0resumed"
    logger.close()
    assert [p.name for p in run_files(tmp_path)] == ["run-strata0resumed.wandb"]
