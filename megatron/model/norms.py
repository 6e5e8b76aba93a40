"""Normalisation registry (NeoX's ``norm`` key)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[Any], nn.Module]

NORMS: dict[str, NormFactory] = {}


def register_norm(name: str, factory: NormFactory) -> None:
    """Make ``norm: <name>`` build ``factory(args)``, a module over the last dimension."""
    NORMS[name] = factory


class LayerNorm(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        eps: float,
        bias: bool = True,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


register_norm(
    "layernorm",
    lambda args: LayerNorm(
        args.hidden_size, args.layernorm_epsilon, args.use_bias_in_norms, args.params_dtype
    ),
)


def build_norm(args: Any) -> nn.Module:
    if args.norm not in NORMS:
        raise ValueError(f"norm: unknown norm {args.norm!r}; expected one of {sorted(NORMS)}")
    return NORMS[args.norm](args)
