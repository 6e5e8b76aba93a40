"""End-to-end training through the real launcher: loss falls, data parallel matches one process,
resume is exact, and bad checkpoints are clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config, write_config
from conftest import run_tool
from safetensors.torch import load_file

pytestmark = pytest.mark.timeout(900)


def train(tmp: Path, name: str, data: str, **overrides) -> tuple[dict, Path]:
    """Train through deepy.py; returns ({(iteration, split): record}, run folder)."""
    run = tmp / name
    settings = dict(
        train_iters=12,
        eval_interval=4,
        eval_iters=2,
        log_interval=1,
        log_dir=str(run / "logs"),
        save=str(run / "ckpt"),
        checkpoint_factor=6,
        split="90,10,0",
        hidden_dropout=0.1,
        attention_dropout=0.1,
        warmup=0.1,
        weight_decay=0.01,
        gradient_clipping=1.0,
        seed=7,
    )
    values = small_config(data, **{**settings, **overrides})
    config = write_config(run / "config.yml", values)
    run_tool("deepy.py", "train.py", config)
    return read_metrics(run / "logs"), run


def read_metrics(log_dir: Path) -> dict:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["iteration"], r["split"]): r for r in map(json.loads, lines)}


def losses(metrics: dict) -> dict:
    return {key: record["lm_loss"] for key, record in metrics.items()}


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e6])
def test_grad_norm_clipper_clips_as_torch_does(max_norm):
    """The norm and clipping of plain optimizers (fp32, ZeRO 0), in one process."""
    from megatron.engine.grad_norm import GradNormClipper, mark_norm_ownership

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    expected = copy.deepcopy(model)
    inputs = torch.randn(5, 4)
    for module in (model, expected):
        module(inputs).pow(2).sum().backward()
    mark_norm_ownership(model, tensor_rank=0)
    clipper = GradNormClipper(model, None, max_norm)
    clipper()
    norm = torch.nn.utils.clip_grad_norm_(expected.parameters(), max_norm or float("inf"))
    assert clipper.norm.dtype == torch.float64  # a device tensor: read at log intervals
    torch.testing.assert_close(clipper.norm.float(), norm)
    for param, reference in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(param.grad, reference.grad)


def test_loss_falls_and_metrics_are_logged(tmp_path, text_dataset):
    metrics, run = train(tmp_path, "run", text_dataset, train_iters=30, checkpoint_factor=0)
    train_lines = [metrics[(i, "train")] for i in range(1, 31)]
    assert train_lines[-1]["lm_loss"] < train_lines[0]["lm_loss"] - 1.0
    for key in (
        "iteration",
        "split",
        "lm_loss",
        "lr",
        "consumed_tokens",
        "tokens_per_sec",
        "grad_norm",
    ):
        assert key in train_lines[-1]
    assert train_lines[-1]["consumed_tokens"] == 30 * 4 * 32
    # Cumulative FLOPs: the same count per consumed token on every line.
    per_token = {line["flops"] / line["consumed_tokens"] for line in train_lines}
    assert len(per_token) == 1 and per_token.pop() > 6 * 64 * 64 * 12 * 2
    assert (0, "valid") in metrics and (30, "valid") in metrics
    assert metrics[(30, "valid")]["lm_loss"] < metrics[(0, "valid")]["lm_loss"]
    # With no periodic saves the run still saves once, at the end.
    assert (run / "ckpt" / "latest").read_text() == "global_step30"
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["global_step30", "latest"]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_two_data_parallel_processes_match_one(tmp_path, text_dataset, zero_stage):
    common = dict(hidden_dropout=0.0, attention_dropout=0.0, checkpoint_factor=0)
    common["zero_optimization"] = {"stage": zero_stage}
    one, _ = train(
        tmp_path, "one", text_dataset, gradient_accumulation_steps=2, num_gpus=1, **common
    )
    two, _ = train(
        tmp_path, "two", text_dataset, gradient_accumulation_steps=1, num_gpus=2, **common
    )
    assert one.keys() == two.keys()
    for key in one:
        assert two[key]["lm_loss"] == pytest.approx(one[key]["lm_loss"], rel=1e-5), key


@pytest.mark.parametrize("precision,zero_stage,async_save", [("fp32", 0, False), ("bf16", 1, True)])
def test_resume_is_exact(tmp_path, text_dataset, precision, zero_stage, async_save):
    """Also from a checkpoint written in the background (async_save) while training went on."""
    settings = dict(precision=precision, zero_optimization={"stage": zero_stage})
    full, _ = train(tmp_path, "full", text_dataset, **settings)
    first, run = train(
        tmp_path, "first", text_dataset, exit_interval=6, async_save=async_save, **settings
    )
    assert max(i for i, _ in first) == 6
    assert (run / "ckpt" / "latest").read_text() == "global_step6"
    second, _ = train(tmp_path, "second", text_dataset, load=str(run / "ckpt"), **settings)
    assert min(i for i, split in second if split == "train") == 7
    assert losses({**first, **second}) == losses(full)
    # The cumulative FLOPs carry on from the checkpoint.
    assert second[(12, "train")]["flops"] == full[(12, "train")]["flops"]


def test_bf16_at_zero_stage_0_steps_as_zero_stage_1(tmp_path, text_dataset):
    """DeepSpeed's bf16 wrapper at ZeRO stage 0 steps the optimizer once while it initialises;
    counted, Adam's first update would be 0.735 lr. Both stages take the same first step."""
    masters = {}
    for stage in (0, 1):
        _, run = train(
            tmp_path,
            f"zero{stage}",
            text_dataset,
            precision="bf16",
            zero_optimization={"stage": stage},
            train_iters=1,
            eval_iters=0,
            warmup=0.0,
        )
        state = load_file(run / "ckpt" / "global_step1" / "optimizer.safetensors")
        masters[stage] = {k: v for k, v in state.items() if k.endswith(".master")}
    assert masters[0].keys() == masters[1].keys() and masters[0]
    for name, master in masters[0].items():
        torch.testing.assert_close(master, masters[1][name], rtol=0, atol=1e-6, msg=name)


def test_checkpoint_layout(tmp_path, text_dataset):
    """Saved in the background (async_save): pruning and publishing leave only the newest."""
    _, run = train(
        tmp_path,
        "run",
        text_dataset,
        keep_last_n_checkpoints=1,
        checkpoint_factor=4,
        async_save=True,
    )
    ckpt = run / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step12", "latest"]
    folder = ckpt / "global_step12"
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["iteration"] == 12
    assert metadata["train_state"]["consumed_train_samples"] == 12 * 4
    assert (folder / "configs" / "config.yml").is_file()
    weights = load_file(folder / "model.safetensors")
    assert weights["embedding.word_embeddings.weight"].shape[1] == 64
    optimizer = load_file(folder / "optimizer.safetensors")
    assert set(optimizer) == {f"{n}.{k}" for n in weights for k in ("exp_avg", "exp_avg_sq")}
    assert not any(p.name.startswith(".") for p in ckpt.iterdir())


def test_finetune_loads_weights_and_starts_at_zero(tmp_path, text_dataset):
    _, base = train(tmp_path, "base", text_dataset, train_iters=8, checkpoint_factor=0)
    tuned, _ = train(
        tmp_path, "tuned", text_dataset, train_iters=8, load=str(base / "ckpt"), finetune=True
    )
    fresh, _ = train(tmp_path, "fresh", text_dataset, train_iters=8, checkpoint_factor=0)
    assert (0, "valid") in tuned
    assert tuned[(0, "valid")]["lm_loss"] < fresh[(0, "valid")]["lm_loss"] - 0.3


def failing_run(tmp_path: Path, data: str, **overrides) -> str:
    values = small_config(data, log_dir=str(tmp_path / "logs"), **overrides)
    config = write_config(tmp_path / "bad.yml", values)
    result = run_tool("deepy.py", "train.py", config, check=False)
    assert result.returncode != 0
    assert (
        not (tmp_path / "logs" / "metrics.jsonl").exists()
        or "train" not in (tmp_path / "logs" / "metrics.jsonl").read_text()
    )
    return result.stderr


def test_missing_load_directory_is_an_error(tmp_path, text_dataset):
    stderr = failing_run(tmp_path, text_dataset, load=str(tmp_path / "nowhere"))
    assert "does not exist" in stderr and "nowhere" in stderr


def test_load_without_latest_is_an_error(tmp_path, text_dataset):
    (tmp_path / "empty").mkdir()
    stderr = failing_run(tmp_path, text_dataset, load=str(tmp_path / "empty"))
    assert "no 'latest'" in stderr


def test_checkpoint_of_another_shape_is_an_error(tmp_path, text_dataset):
    _, run = train(tmp_path, "run", text_dataset, train_iters=2, checkpoint_factor=0)
    stderr = failing_run(tmp_path, text_dataset, hidden_size=32, load=str(run / "ckpt"), save=None)
    assert "does not match the configured model" in stderr
    assert "embedding.word_embeddings.weight" in stderr and "[384, 64]" in stderr


def test_secrets_stay_out_of_every_file_a_run_writes(tmp_path, text_dataset, monkeypatch):
    """A W&B key and an HF token in the environment and a credential in the config appear in
    no file the run writes (logs, metrics, TensorBoard, offline W&B, checkpoint configs), nor
    in what it prints (the launch command carries the config)."""
    secrets = {
        "WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd",
        "HF_TOKEN": "hf_secretTOKEN0123456789",
    }
    in_config = "cometsecret98765"
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    wandb_home = tmp_path / "wandb_home"
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(wandb_home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    values = small_config(
        text_dataset,
        train_iters=2,
        log_interval=1,
        eval_interval=2,
        eval_iters=1,
        log_dir=str(run / "logs"),
        tensorboard_dir=str(run / "tb"),
        save=str(run / "ckpt"),
        checkpoint_factor=2,
        use_wandb=True,
        comet_others={"api_key": in_config, "note": "kept"},
    )
    config = write_config(tmp_path / "config.yml", values)
    result = run_tool("deepy.py", "train.py", config)

    assert (run / "ckpt" / "global_step2" / "configs" / "config.yml").is_file()
    assert list((run / "logs").rglob("*.wandb")), "W&B wrote no offline run"
    # The run's id goes into the checkpoint: a resumed or requeued job continues that run.
    metadata = json.loads((run / "ckpt" / "global_step2" / "metadata.json").read_text())
    assert list((run / "logs").rglob(f"run-{metadata['train_state']['wandb_run_id']}.wandb"))
    assert list((run / "tb").iterdir())
    written = [p for folder in (run, wandb_home) for p in folder.rglob("*") if p.is_file()]
    for secret in [*secrets.values(), in_config]:
        assert secret not in result.stdout + result.stderr
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret!r} is in {path}"
    stored = (run / "ckpt" / "global_step2" / "configs" / "config.yml").read_text()
    assert "<redacted>" in stored and "kept" in stored
