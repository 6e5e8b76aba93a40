"""The LSTM baseline (`model_type: lstm`): it trains through the launcher and its loss falls,
resumes exactly from its checkpoints, two data-parallel processes follow one, and tensor and
pipeline parallelism are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _config_fixtures import small_config, write_config
from conftest import run_tool

from megatron.config import ConfigError, NeoXArgs
from megatron.model import LSTMModel, ModelConfig, build_model, count_parameters

pytestmark = pytest.mark.timeout(600)


def train(run: Path, data: str, **overrides) -> dict:
    """Train the LSTM through deepy.py; {(iteration, split): lm_loss}."""
    settings = dict(
        model_type="lstm",
        train_iters=24,
        eval_interval=12,
        eval_iters=2,
        log_interval=1,
        log_dir=str(run / "logs"),
        save=str(run / "ckpt"),
        checkpoint_factor=12,
        split="90,10,0",
        hidden_dropout=0.1,
        optimizer={"type": "Adam", "params": {"lr": 1.0e-2, "betas": [0.9, 0.95]}},
        seed=7,
    )
    config = write_config(run / "config.yml", small_config(data, **{**settings, **overrides}))
    run_tool("deepy.py", "train.py", config)
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return {(r["iteration"], r["split"]): r["lm_loss"] for r in map(json.loads, lines)}


def test_lstm_loss_falls_and_resume_is_exact(tmp_path, text_dataset):
    full = train(tmp_path / "full", text_dataset)
    assert full[(24, "train")] < full[(1, "train")] - 1.0
    assert full[(24, "valid")] < full[(0, "valid")]
    first = train(tmp_path / "first", text_dataset, exit_interval=12)
    assert (tmp_path / "first" / "ckpt" / "latest").read_text() == "global_step12"
    second = train(tmp_path / "second", text_dataset, load=str(tmp_path / "first" / "ckpt"))
    assert min(i for i, split in second if split == "train") == 13
    assert {**first, **second} == full


@pytest.mark.parametrize("no_weight_tying", [False, True])
def test_parameter_count_is_the_models(no_weight_tying):
    args = NeoXArgs.from_dict(small_config(model_type="lstm", no_weight_tying=no_weight_tying))
    model = build_model(ModelConfig.from_neox(args))
    assert isinstance(model, LSTMModel)
    assert count_parameters(model) == args.num_parameters


@pytest.mark.parametrize("key", ["model_parallel_size", "pipe_parallel_size"])
def test_tensor_or_pipeline_parallel_lstm_is_a_config_error(key):
    with pytest.raises(ConfigError, match=f"{key}=2.*data parallel only"):
        NeoXArgs.from_dict(small_config(model_type="lstm", num_gpus=2, **{key: 2}))


def test_two_data_parallel_lstm_processes_match_one(tmp_path, text_dataset):
    common = dict(hidden_dropout=0.0, train_iters=6, checkpoint_factor=0)
    one = train(tmp_path / "one", text_dataset, gradient_accumulation_steps=2, **common)
    two = train(
        tmp_path / "two", text_dataset, num_gpus=2, zero_optimization={"stage": 1}, **common
    )
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
