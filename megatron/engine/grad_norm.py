"""The gradient norm of the whole model, counted once per full weight, and clipping to it.

``mark_norm_ownership`` tells every norm computation (DeepSpeed's, for the optimizers it wraps,
and ``GradNormClipper``) which gradients this rank counts, so each full weight counts once over
the tensor and pipeline ranks. DeepSpeed reports the norm only for optimizers it wraps (ZeRO,
bf16, fp16); when it steps ours directly, a ``GradNormClipper`` computes it and clips instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def mark_norm_ownership(model: nn.Module, tensor_rank: int) -> None:
    """Set ``param.model_parallel``: whether this rank counts the parameter in the global norm.

    DeepSpeed counts a parameter when its model-parallel rank (over pipe x tensor) is 0 or the
    parameter has ``model_parallel`` set. Every stage must count its own layers; a weight
    replicated across tensor ranks counts on tensor rank 0 only, and a pipeline's last-stage copy
    of a tied embedding (``ds_pipe_replicated``) not at all.
    """
    for param in model.parameters():
        replicated_copy = getattr(param, "ds_pipe_replicated", False)
        split = hasattr(param, "partition_dim")
        param.model_parallel = not replicated_copy and (split or tensor_rank == 0)
        if replicated_copy and getattr(param, "tensor_model_parallel", False):
            param.tensor_model_parallel = False


def plain_optimizer(args: Any) -> bool:
    """Whether DeepSpeed steps our optimizer directly (fp32, ZeRO 0): it then clips gradients
    but does not report their norm, so a ``GradNormClipper`` does both instead."""
    return args.precision == "fp32" and not args.zero_stage


class GradNormClipper:
    """An optimizer step pre-hook: the whole model's gradient norm over the model-parallel
    ``group`` (after the data-parallel all-reduce, before clipping), kept as a device tensor in
    ``norm``, and clipping to ``max_norm`` (0: none) like DeepSpeed's clip_grad_norm_. Counts
    the parameters ``mark_norm_ownership`` marked."""

    def __init__(self, model: nn.Module, group: Any, max_norm: float) -> None:
        self.parameters = list(model.parameters())
        self.counted = [p for p in self.parameters if p.model_parallel]
        self.group = group
        self.max_norm = max_norm
        self.norm: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, *_: Any) -> None:
        square = torch.zeros((), dtype=torch.float64, device=self.parameters[0].device)
        for param in self.counted:
            if param.grad is not None:
                square += param.grad.double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(square, group=self.group)
        self.norm = square.sqrt()
        if self.max_norm > 0:
            # Multiplying by a clamped coefficient (1 when under the limit, which changes
            # nothing) keeps the host from waiting for the norm.
            coefficient = (self.max_norm / (self.norm + 1e-6)).clamp(max=1.0)
            for param in self.parameters:
                if param.grad is not None:
                    param.grad.mul_(coefficient.to(param.grad.dtype))
