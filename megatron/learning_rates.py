"""Learning-rate schedules: linear warmup, then a registered decay style, never below `min_lr`.

Follows GPT-NeoX's AnnealingLR: warmup lasts `warmup × lr_decay_iters` iterations and the decay
style takes over from there. constant, linear, cosine and wsd reach `min_lr` at `lr_decay_iters`
and stay there; exponential (NeoX's formula) halves the rate every decay span and inv_sqrt falls
as 1/sqrt(iteration), both floored at `min_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from megatron.neox_arguments.rules import register_names, register_rule
from megatron.registry import Registry


@dataclass(frozen=True)
class DecayPoint:
    """An iteration past warmup and the schedule it belongs to: what a decay style reads."""

    iteration: int
    warmup_iters: int
    total_iters: int
    start_lr: float
    min_lr: float
    options: Mapping[str, Any]  # the values of the style's own config keys

    @property
    def span(self) -> int:
        """Iterations from the end of warmup to lr_decay_iters."""
        return max(self.total_iters - self.warmup_iters, 1)

    @property
    def elapsed(self) -> float:
        """Decay spans since the end of warmup (past 1 after lr_decay_iters)."""
        return (self.iteration - self.warmup_iters) / self.span

    @property
    def progress(self) -> float:
        """Progress through the decay span, 0 -> 1, then 1."""
        return min(max(self.elapsed, 0.0), 1.0)

    def between(self, factor: float) -> float:
        """The rate a `factor` of the way from min_lr (0) to the peak (1)."""
        return self.min_lr + (self.start_lr - self.min_lr) * factor


DecayFn = Callable[[DecayPoint], float]


@dataclass(frozen=True)
class DecayStyle:
    rate: DecayFn
    options: tuple[str, ...]  # config keys the style reads besides the common ones


DECAY_STYLES: Registry[DecayStyle] = Registry(
    "decay style", register_with="megatron.learning_rates.register_decay_style"
)
register_names("lr_decay_style", DECAY_STYLES)


def register_decay_style(
    name: str, *, options: tuple[str, ...] = ()
) -> Callable[[DecayFn], DecayFn]:
    """Decorator making ``lr_decay_style: <name>`` set the rate after warmup to
    ``rate(point)``; ``options`` names the config keys it reads from ``point.options``."""

    def decorate(rate: DecayFn) -> DecayFn:
        DECAY_STYLES.register(name, DecayStyle(rate, options))
        return rate

    return decorate


@register_decay_style("constant")
def _constant(at: DecayPoint) -> float:
    return at.start_lr


@register_decay_style("linear")
def _linear(at: DecayPoint) -> float:
    return at.between(1.0 - at.progress)


def _cosine_factor(progress: float) -> float:
    return 0.5 * (math.cos(math.pi * progress) + 1.0)


@register_decay_style("cosine")
def _cosine(at: DecayPoint) -> float:
    return at.between(_cosine_factor(at.progress))


@register_decay_style("exponential")
def _exponential(at: DecayPoint) -> float:
    # GPT-NeoX: start_lr * exp(-0.693 t / span), halving every span and not stopping at its end.
    return at.start_lr * math.exp(-0.693 * at.elapsed)


@register_decay_style("inv_sqrt")
def _inv_sqrt(at: DecayPoint) -> float:
    # Continuous with warmup: the peak at its end, then peak * sqrt(warmup / iteration).
    timescale = max(at.warmup_iters, 1)
    return at.start_lr * math.sqrt(timescale / max(at.iteration, timescale))


# Factor (1 -> 0) over WSD's final decay phase (the names wsd_decay_shape accepts); 1-sqrt is
# Hägele et al. (2024)'s cooldown.
WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": _cosine_factor,
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


@register_decay_style("wsd", options=("wsd_decay_fraction", "wsd_decay_shape"))
def _wsd(at: DecayPoint) -> float:
    # Warmup-stable-decay: the peak until the final fraction of lr_decay_iters, then the decay.
    decay_iters = at.options["wsd_decay_fraction"] * at.total_iters
    decay_start = at.total_iters - decay_iters
    if at.iteration <= decay_start:
        return at.start_lr
    progress = min((at.iteration - decay_start) / max(decay_iters, 1e-12), 1.0)
    return at.between(WSD_SHAPES[at.options["wsd_decay_shape"]](progress))


@register_rule("wsd_phases")
def _check_wsd(args, problems) -> None:
    if args.lr_decay_style != "wsd":
        return
    if not 0 < args.wsd_decay_fraction <= 1:
        problems.add(f"wsd_decay_fraction must be in (0, 1], got {args.wsd_decay_fraction}")
    elif args.warmup + args.wsd_decay_fraction > 1:
        problems.add(
            f"warmup ({args.warmup}) + wsd_decay_fraction ({args.wsd_decay_fraction}) exceed 1: "
            "the decay would start before warmup ends (both are fractions of lr_decay_iters)"
        )


# What a checkpoint's schedule records besides its position (the names of its state_dict).
SCHEDULE_SHAPE = ("start_lr", "warmup_iters", "total_iters", "decay_style", "min_lr", "options")


class AnnealingLR:
    """Sets the learning rate of every param group for a given iteration.

    Param groups may carry an `lr_mult` (muP and similar) that scales the schedule's value.
    `options` holds the values of the config keys the decay style reads (wsd's phases).
    """

    def __init__(
        self,
        optimizer,
        start_lr: float,
        warmup_iters: int,
        total_iters: int,
        decay_style: str,
        min_lr: float = 0.0,
        on_resume: str = "match",
        options: Mapping[str, Any] | None = None,
    ):
        self.on_resume = on_resume
        self.optimizer = optimizer
        self.start_lr = start_lr
        self.warmup_iters = warmup_iters
        self.total_iters = max(total_iters, 1)
        self.decay_style = decay_style
        self.min_lr = min_lr
        self.options = dict(options or {})
        self._use_style()
        self.num_iters = 0
        self.step(0)

    def _use_style(self) -> None:
        self.style = DECAY_STYLES.get(self.decay_style, key="lr_decay_style")
        missing = [key for key in self.style.options if key not in self.options]
        if missing:
            raise ValueError(
                f"lr_decay_style {self.decay_style!r} reads {', '.join(missing)}: pass them in "
                "options"
            )

    def get_lr(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.start_lr * iteration / self.warmup_iters
        point = DecayPoint(
            iteration, self.warmup_iters, self.total_iters, self.start_lr, self.min_lr, self.options
        )
        return max(self.style.rate(point), self.min_lr)

    def step(self, iteration: int | None = None) -> float:
        self.num_iters = self.num_iters + 1 if iteration is None else iteration
        lr = self.get_lr(self.num_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in SCHEDULE_SHAPE} | {"num_iters": self.num_iters}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the shape follows `on_resume` where the checkpoint's differs:
        "config" (override_lr_scheduler), "checkpoint" (use_checkpoint_lr_scheduler) or
        "match" (NeoX's default: a difference is an error)."""
        saved = {key: state[key] for key in SCHEDULE_SHAPE if key in state}
        if self.on_resume == "checkpoint":
            for key, value in saved.items():
                setattr(self, key, value)
            self._use_style()
        elif self.on_resume == "match":
            differ = [
                f"{key} {value!r} (checkpoint) vs {getattr(self, key)!r} (config)"
                for key, value in saved.items()
                if value != getattr(self, key)
            ]
            if differ:
                raise ValueError(
                    "the checkpoint's learning-rate schedule differs from the config's: "
                    + "; ".join(differ)
                    + ". Set override_lr_scheduler: true to follow the config, or "
                    "use_checkpoint_lr_scheduler: true to follow the checkpoint"
                )
        self.step(int(state["num_iters"]))


def build_lr_scheduler(args, optimizer) -> AnnealingLR:
    decay_iters = args.lr_decay_iters or args.train_iters
    style = DECAY_STYLES.get(args.lr_decay_style, key="lr_decay_style")
    return AnnealingLR(
        optimizer,
        start_lr=args.lr,
        warmup_iters=int(args.warmup * decay_iters),
        total_iters=decay_iters,
        decay_style=args.lr_decay_style,
        min_lr=args.min_lr,
        on_resume=(
            "config"
            if args.override_lr_scheduler
            else "checkpoint"
            if args.use_checkpoint_lr_scheduler
            else "match"
        ),
        options={key: getattr(args, key) for key in style.options},
    )
