"""Faults during training, through the real launcher: non-finite steps are skipped (and a run of
them stops with the last good weights saved), and a rank that stops making progress ends the job
with the collective named and every rank's stacks. Faults come from tests/faulty_train.py, which
runs train.py's Trainer with its loss poisoned or its step stalled on chosen ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config, write_config
from conftest import run_tool

from megatron.checkpoint.reader import open_checkpoint
from megatron.neox_arguments import ConfigError, NeoXArgs

pytestmark = pytest.mark.timeout(300)


def faulty_run(tmp: Path, data: str, check: bool = True, **overrides):
    """Train through deepy.py with the faults the FAULT_* variables name; (train records by
    iteration, the finished process, the run folder)."""
    settings = dict(
        train_iters=6,
        log_interval=1,
        eval_interval=1000,
        eval_iters=0,
        split="100,0,0",
        warmup=0.5,
        log_dir=str(tmp / "logs"),
        save=str(tmp / "ckpt"),
        checkpoint_factor=1,
        seed=3,
    )
    config = write_config(tmp / "config.yml", small_config(data, **{**settings, **overrides}))
    result = run_tool("deepy.py", "tests/faulty_train.py", config, check=check)
    log = tmp / "logs" / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    records = {r["iteration"]: r for r in map(json.loads, lines) if r["split"] == "train"}
    return records, result, tmp


def state(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a checkpoint, prefixed by kind."""
    checkpoint = open_checkpoint(run / "ckpt" / f"global_step{iteration}")
    tensors = {f"model/{k}": checkpoint.model.get(k) for k in checkpoint.model.keys()}
    optimizer = checkpoint.optimizer
    tensors.update({f"optimizer/{k}": optimizer.get(k) for k in optimizer.keys()})
    return tensors


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks_the_fault_keys(text_dataset):
    args = NeoXArgs.from_dict(
        small_config(text_dataset, skip_nonfinite_steps=3, distributed_timeout_minutes=0.5)
    )
    assert (args.skip_nonfinite_steps, args.distributed_timeout_minutes) == (3, 0.5)
    assert NeoXArgs.from_dict(small_config(text_dataset)).skip_nonfinite_steps == 0
    with pytest.raises(ConfigError, match="skip_nonfinite_steps must be >= 0, got -1"):
        NeoXArgs.from_dict(small_config(text_dataset, skip_nonfinite_steps=-1))
    with pytest.raises(ConfigError, match="distributed_timeout_minutes must be > 0, got 0"):
        NeoXArgs.from_dict(small_config(text_dataset, distributed_timeout_minutes=0))


@pytest.mark.parametrize("fault", ["gradient", "loss"])
def test_guard_leaves_weights_and_optimizer_state_alone(fault):
    """In one process: a step with a NaN gradient, or a NaN loss seen by the guard, changes
    neither the weights nor Adam's moments and step count; the next finite step does."""
    from megatron.engine.nonfinite import NonFiniteGuard

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    guard = NonFiniteGuard(limit=1)
    optimizer.register_step_pre_hook(guard)

    def step(poison: bool) -> str | None:
        guard.begin()
        loss = model(torch.randn(3, 4)).pow(2).mean()
        if poison and fault == "loss":
            guard.observe(torch.tensor(float("inf")))
        loss.backward()
        if poison and fault == "gradient":
            model.weight.grad[0, 0] = float("nan")
        optimizer.step()
        optimizer.zero_grad()
        return guard.problem({"lm_loss": loss.detach()})

    assert step(poison=False) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    problem = step(poison=True)
    assert problem == (
        "a gradient is not finite" if fault == "gradient" else "a rank's loss is not finite"
    )
    assert guard.count(problem) is False and guard.count(problem) is True  # the second in a row
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in optimizer.state[model.weight].items())
    assert step(poison=False) is None and guard.count(None) is False
    assert not torch.equal(before["weight"], model.weight)
    assert optimizer.state[model.weight]["step"] == moments["step"] + 1


def test_a_nonfinite_step_is_skipped_and_training_recovers(tmp_path, text_dataset, monkeypatch):
    monkeypatch.setenv("FAULT_NAN", "0:3")  # rank 0, iteration 3
    records, _, run = faulty_run(tmp_path, text_dataset, skip_nonfinite_steps=1)
    assert math.isnan(records[3]["lm_loss"]) and records[3]["skipped"]
    assert [records[i]["skipped_steps"] for i in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert not any(records[i]["skipped"] for i in (1, 2, 4, 5, 6))
    assert all(math.isfinite(records[i]["lm_loss"]) for i in (4, 5, 6))
    # Weights and optimizer state are untouched by the skipped step; the next step updates.
    assert same(state(run, 2), state(run, 3))
    assert not same(state(run, 3), state(run, 4))
    # The schedule did not advance: step 4 runs at the rate step 3 would have had.
    assert records[4]["lr"] == records[3]["lr"] != records[5]["lr"]
    # The data moved on past the bad batch.
    assert records[4]["consumed_tokens"] == 4 * records[1]["consumed_tokens"]


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_checkpoint(
    tmp_path, text_dataset, monkeypatch
):
    monkeypatch.setenv("FAULT_NAN", "0:3,4,5")
    records, result, run = faulty_run(
        tmp_path,
        text_dataset,
        check=False,
        skip_nonfinite_steps=2,
        checkpoint_factor=0,
        extra_save_iters=[2],
    )
    assert result.returncode != 0
    assert "error: iteration 5: the loss is nan and the gradient norm is nan" in result.stderr
    assert "3 non-finite step(s) in a row, skip_nonfinite_steps is 2" in result.stderr
    assert max(records) == 5 and records[5]["skipped_steps"] == 3
    assert (run / "ckpt" / "latest").read_text() == "global_step5"
    assert same(state(run, 2), state(run, 5))


def test_zero_tolerance_stops_at_the_first_nonfinite_step(tmp_path, text_dataset, monkeypatch):
    monkeypatch.setenv("FAULT_NAN", "0:2")
    records, result, _ = faulty_run(tmp_path, text_dataset, check=False, save=None)
    assert result.returncode != 0
    assert "error: iteration 2: the loss is nan" in result.stderr
    assert "skip_nonfinite_steps is 0: stopping; no checkpoint saved" in result.stderr
    assert max(records) == 2 and records[2]["skipped"]


def test_nan_on_one_data_parallel_rank_is_skipped_by_both(tmp_path, text_dataset, monkeypatch):
    """Rank 1 alone sees the NaN; ZeRO 1 splits the optimizer state between the ranks, so the
    checkpoint holds both ranks' halves: both skipped."""
    monkeypatch.setenv("FAULT_NAN", "1:3")
    records, _, run = faulty_run(
        tmp_path,
        text_dataset,
        num_gpus=2,
        skip_nonfinite_steps=1,
        zero_optimization={"stage": 1},
        train_iters=4,
    )
    assert records[3]["skipped"] and records[4]["skipped_steps"] == 1
    assert math.isfinite(records[4]["lm_loss"])
    assert same(state(run, 2), state(run, 3))
    assert not same(state(run, 3), state(run, 4))


def test_a_stalled_rank_ends_the_job_with_the_collective_named(tmp_path, text_dataset, monkeypatch):
    """Rank 1 sleeps at the start of step 2; rank 0 waits for it in the gradient all-reduce
    until the 3-second timeout, then the job ends."""
    monkeypatch.setenv("FAULT_STALL", "1:2")
    _, result, _ = faulty_run(
        tmp_path,
        text_dataset,
        check=False,
        num_gpus=2,
        distributed_timeout_minutes=0.05,
        save=None,
    )
    assert result.returncode != 0
    assert "error: rank 0, iteration 2: all_reduce over ranks [0, 1] failed" in result.stderr
    assert "Timed out waiting 3000ms" in result.stderr
    # Rank 1's stack, printed by faulthandler as the launcher stopped it, shows where it was.
    assert 'faulty_train.py", line' in result.stderr and " in stall" in result.stderr
