"""Steps whose loss or gradient norm is NaN/Inf: their update is not applied, and a run of them
stops training (``skip_nonfinite_steps``).

``NonFiniteGuard`` is a step pre-hook on the torch optimizer that DeepSpeed (or its ZeRO/bf16
wrapper) steps. Before the first update of a step it reduces two flags over the whole world
(a loss this rank saw is not finite; a gradient this rank holds is not finite), so every data,
tensor and pipeline rank takes the same decision; on a bad step it drops the gradients, and a torch
optimizer leaves a parameter without ``.grad`` untouched: no update, no change to its state
(moments, step count), no weight decay. DeepSpeed's ZeRO and bf16 wrappers already skip when
their global norm is not finite (before this hook would run); ``problem`` reads the step's
reduced loss and norm afterwards, so both ways count the same.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


class NonFiniteSteps(Exception):
    """Training stopped: too many non-finite steps in a row."""


class NonFiniteGuard:
    def __init__(self, limit: int, norm_counts: bool = True) -> None:
        self.limit = limit  # consecutive non-finite steps that are skipped; the next one stops
        # Under fp16, DeepSpeed's loss scaler owns gradient overflow: it skips the step and
        # lowers the scale, which is routine, not a fault.
        self.norm_counts = norm_counts
        self.consecutive = 0
        self.begin()

    def begin(self) -> None:
        """Start a step: forget the previous step's losses and decision."""
        self.loss_bad = torch.zeros((), dtype=torch.bool)
        # Decided at the step's first optimizer update, the same on every rank: whether some
        # rank's loss, or some gradient, was not finite.
        self.rejected: bool | None = None
        self.loss_rejected = False

    def observe(self, loss: torch.Tensor) -> None:
        """A micro-batch loss of this rank (kept on the device: no wait here)."""
        self.loss_bad = self.loss_bad.to(loss.device) | ~torch.isfinite(loss.detach()).all()

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.rejected is None:
            device = params[0].device if params else self.loss_bad.device
            grad_bad = torch.zeros((), dtype=torch.bool, device=device)
            for param in params:
                if param.grad is not None:
                    grad_bad |= ~torch.isfinite(param.grad).all()
            flags = torch.stack([self.loss_bad.to(device), grad_bad]).to(torch.int32)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the whole world decides as one
            loss_rejected, grad_rejected = flags.tolist()
            self.loss_rejected = bool(loss_rejected)
            self.rejected = bool(loss_rejected or grad_rejected)
        if self.rejected:
            for param in params:
                param.grad = None

    def problem(self, metrics: dict) -> str | None:
        """What was not finite in the step just taken (None: nothing); its update was not
        applied when this says something. ``metrics`` hold the step's loss and norm, reduced."""
        loss = float(metrics["lm_loss"])
        norm = float(metrics.get("grad_norm", 0.0))
        parts = []
        if not math.isfinite(loss):
            parts.append(f"the loss is {loss}")
        elif self.loss_rejected:
            parts.append("a rank's loss is not finite")
        if self.norm_counts and not math.isfinite(norm):
            parts.append(f"the gradient norm is {norm}")
        if self.rejected and not parts:
            parts.append("a gradient is not finite")
        return " and ".join(parts) or None

    def count(self, problem: str | None) -> bool:
        """Record a step's outcome; True when it makes one non-finite step too many."""
        self.consecutive = self.consecutive + 1 if problem else 0
        return self.consecutive > self.limit
