"""Learning-rate schedules: linear warmup, then a registered decay style down to `min_lr`.

Follows GPT-NeoX's AnnealingLR: warmup lasts `warmup × lr_decay_iters` iterations; decay runs from
the end of warmup to `lr_decay_iters`; after that the rate stays at `min_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from megatron.neox_arguments.rules import register_names
from megatron.registry import Registry

# A decay style maps progress through the decay phase (0 -> 1) to a factor (1 -> 0) between
# the peak and min_lr.
DecayFn = Callable[[float], float]
DECAY_STYLES: Registry[DecayFn] = Registry(
    "decay style", register_with="megatron.learning_rates.register_decay_style"
)
register_names("lr_decay_style", DECAY_STYLES)


def register_decay_style(name: str) -> Callable[[DecayFn], DecayFn]:
    """Decorator making ``lr_decay_style: <name>`` decay by the decorated function."""
    return DECAY_STYLES.register(name)


@register_decay_style("constant")
def _constant(progress: float) -> float:
    return 1.0


@register_decay_style("linear")
def _linear(progress: float) -> float:
    return 1.0 - progress


@register_decay_style("cosine")
def _cosine(progress: float) -> float:
    return 0.5 * (math.cos(math.pi * progress) + 1.0)


# What a checkpoint's schedule records besides its position (the names of its state_dict).
SCHEDULE_SHAPE = ("start_lr", "warmup_iters", "total_iters", "decay_style", "min_lr")


class AnnealingLR:
    """Sets the learning rate of every param group for a given iteration.

    Param groups may carry an `lr_mult` (muP and similar) that scales the schedule's value.
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
    ):
        self.decay_fn = DECAY_STYLES.get(decay_style, key="lr_decay_style")
        self.on_resume = on_resume
        self.optimizer = optimizer
        self.start_lr = start_lr
        self.warmup_iters = warmup_iters
        self.total_iters = max(total_iters, 1)
        self.decay_style = decay_style
        self.min_lr = min_lr
        self.num_iters = 0
        self.step(0)

    def get_lr(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.start_lr * iteration / self.warmup_iters
        if self.decay_style == "constant":
            return self.start_lr
        if iteration > self.total_iters:
            return self.min_lr
        decay_span = max(self.total_iters - self.warmup_iters, 1)
        progress = (iteration - self.warmup_iters) / decay_span
        factor = self.decay_fn(progress)
        return self.min_lr + (self.start_lr - self.min_lr) * factor

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
            self.decay_fn = DECAY_STYLES.get(self.decay_style, key="lr_decay_style")
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
    )
