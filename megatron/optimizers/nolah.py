"""NOLAH's modifications of Muon, each a function of one logical matrix (so that every parallel
layout computes them on the same full matrix): gradient gating, momentum scaling of the largest
gradients, and a non-linear projection of the momentum before it is orthogonalised."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda g: torch.tanh(g) * g.abs(),
    "sigmoid": lambda g: torch.sigmoid(g) * g,
    "relu": F.relu,
    "none": lambda g: g,
}
PROJECTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,  # M * sigmoid(M)
    "none": lambda m: m,
}


@dataclass(frozen=True)
class Nolah:
    """The options; the defaults (all off) are plain Muon."""

    gate: str = "none"
    momentum_scale: float | None = None  # the momentum where |g| exceeds the percentile
    scale_percentile: float = 95.0
    projection: str = "none"


def momentum_coefficients(grad: torch.Tensor, momentum: float, nolah: Nolah) -> torch.Tensor:
    """The momentum per element: ``nolah.momentum_scale`` where |grad| exceeds its
    ``scale_percentile``-th percentile over the matrix, ``momentum`` elsewhere."""
    magnitude = grad.abs().flatten()
    k = max(1, math.ceil(nolah.scale_percentile / 100 * magnitude.numel()))
    threshold = magnitude.kthvalue(k).values  # kthvalue, unlike quantile, has no size limit
    above = grad.abs() > threshold
    return torch.where(above, nolah.momentum_scale, momentum).to(grad.dtype)
