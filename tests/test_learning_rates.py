"""Every schedule's rate at fixed iterations, and resuming one: NeoX's override_lr_scheduler /
use_checkpoint_lr_scheduler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from _config_fixtures import small_config

from megatron.learning_rates import DECAY_STYLES, AnnealingLR, build_lr_scheduler
from megatron.neox_arguments import ConfigError, NeoXArgs


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
        wsd_decay_fraction=0.2,
        wsd_decay_shape="linear",
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_lr_scheduler(SimpleNamespace(**{**vars(args), **settings}), optimizer)


# lr 1, min_lr 0.1, 100 decay iterations of which 10 warmup: the decay span is 90 iterations.
# Warmup is linear from 0 in every style; wsd decays over iterations 80-100.
EXPECTED = [
    ("constant", {}, {5: 0.5, 10: 1.0, 55: 1.0, 150: 1.0}),
    ("linear", {}, {5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
    # 0.1 + 0.9 * (cos(pi t) + 1) / 2 at t = 1/3, 1/2.
    ("cosine", {}, {5: 0.5, 40: 0.775, 55: 0.55, 100: 0.1, 150: 0.1}),
    # NeoX: exp(-0.693 t) for t decay spans since warmup (halving each span), floored at min_lr.
    (
        "exponential",
        {},
        {
            5: 0.5,
            10: 1.0,
            55: 0.707158819,
            100: 0.500073596,
            280: 0.125055205,
            370: 0.1,
        },
    ),
    # sqrt(10 / iteration), floored at min_lr.
    ("inv_sqrt", {}, {5: 0.5, 10: 1.0, 40: 0.5, 90: 1 / 3, 1000: 0.1, 4000: 0.1}),
    ("wsd", {}, {5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 85: 0.775, 90: 0.55, 100: 0.1, 120: 0.1}),
    ("wsd", {"wsd_decay_shape": "cosine"}, {80: 1.0, 90: 0.55, 100: 0.1}),
    # 0.1 + 0.9 * (1 - sqrt(t)) at t = 1/4, 1/2.
    (
        "wsd",
        {"wsd_decay_shape": "1-sqrt"},
        {
            80: 1.0,
            85: 0.55,
            90: 0.1 + 0.9 * (1 - math.sqrt(0.5)),
            100: 0.1,
        },
    ),
    # The final half: decay from iteration 50.
    ("wsd", {"wsd_decay_fraction": 0.5}, {50: 1.0, 75: 0.55, 100: 0.1}),
]


@pytest.mark.parametrize(("style", "settings", "rates"), EXPECTED)
def test_every_schedule_at_fixed_iterations(style: str, settings: dict, rates: dict) -> None:
    run = schedule(lr_decay_style=style, **settings)
    for iteration, expected in rates.items():
        assert run.get_lr(iteration) == pytest.approx(expected, rel=1e-8), iteration


@pytest.mark.parametrize("style", list(DECAY_STYLES))
def test_every_registered_style_is_accepted_and_builds(style: str) -> None:
    args = NeoXArgs.from_dict(small_config(lr_decay_style=style))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    run = build_lr_scheduler(args, optimizer)
    run.step(args.train_iters)
    assert args.min_lr <= optimizer.param_groups[0]["lr"] <= args.lr


def test_wsd_checks_its_phases_at_config_time() -> None:
    base = small_config(lr_decay_style="wsd", warmup=0.3, wsd_decay_fraction=0.8)
    with pytest.raises(ConfigError, match=r"warmup \(0.3\) \+ wsd_decay_fraction \(0.8\) exceed 1"):
        NeoXArgs.from_dict(base)
    with pytest.raises(ConfigError, match=r"wsd_decay_fraction must be in \(0, 1\], got 0.0"):
        NeoXArgs.from_dict({**base, "wsd_decay_fraction": 0.0})
    with pytest.raises(ConfigError, match="wsd_decay_shape"):
        NeoXArgs.from_dict({**base, "wsd_decay_fraction": 0.2, "wsd_decay_shape": "sqrt"})
    args = NeoXArgs.from_dict({**base, "wsd_decay_fraction": 0.2, "wsd_decay_shape": "1-sqrt"})
    assert (args.lr_decay_style, args.wsd_decay_shape) == ("wsd", "1-sqrt")


def test_a_checkpoint_with_other_wsd_phases_is_an_error_naming_them() -> None:
    run = schedule(lr_decay_style="wsd")
    run.step(50)
    with pytest.raises(ValueError, match="options .*'wsd_decay_fraction': 0.2.* vs .*0.5"):
        schedule(lr_decay_style="wsd", wsd_decay_fraction=0.5).load_state_dict(run.state_dict())


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
