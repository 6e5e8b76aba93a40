"""Resuming a learning-rate schedule: NeoX's override_lr_scheduler / use_checkpoint_lr_scheduler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron.learning_rates import AnnealingLR, build_lr_scheduler


def schedule(total_iters: int = 100, **settings) -> AnnealingLR:
    args = SimpleNamespace(
        lr=1.0,
        min_lr=0.1,
        warmup=0.1,
        lr_decay_iters=None,
        train_iters=total_iters,
        lr_decay_style="cosine",
        override_lr_scheduler=False,
        use_checkpoint_lr_scheduler=False,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_lr_scheduler(SimpleNamespace(**{**vars(args), **settings}), optimizer)


@pytest.fixture
def saved() -> dict:
    run = schedule()
    run.step(50)
    return run.state_dict()


def test_the_same_schedule_resumes_at_its_position(saved: dict) -> None:
    resumed = schedule()
    resumed.load_state_dict(saved)
    assert resumed.num_iters == 50
    assert resumed.optimizer.param_groups[0]["lr"] == schedule().get_lr(50)


def test_another_schedule_is_an_error_naming_what_differs_and_the_keys(saved: dict) -> None:
    with pytest.raises(ValueError) as info:
        schedule(total_iters=200, lr_decay_style="linear").load_state_dict(saved)
    message = str(info.value)
    assert "total_iters 100 (checkpoint) vs 200 (config)" in message
    assert "decay_style 'cosine' (checkpoint) vs 'linear' (config)" in message
    assert "override_lr_scheduler: true" in message
    assert "use_checkpoint_lr_scheduler: true" in message


def test_override_lr_scheduler_follows_the_config(saved: dict) -> None:
    resumed = schedule(total_iters=200, override_lr_scheduler=True)
    resumed.load_state_dict(saved)
    assert (resumed.total_iters, resumed.warmup_iters, resumed.num_iters) == (200, 20, 50)
    assert resumed.optimizer.param_groups[0]["lr"] == schedule(total_iters=200).get_lr(50)


def test_use_checkpoint_lr_scheduler_follows_the_checkpoint(saved: dict) -> None:
    resumed = schedule(total_iters=200, lr_decay_style="linear", use_checkpoint_lr_scheduler=True)
    resumed.load_state_dict(saved)
    assert (resumed.total_iters, resumed.decay_style) == (100, "cosine")
    assert resumed.get_lr(80) == schedule().get_lr(80)
