"""Normalisation registry (NeoX's ``norm`` key).

Parameter names are canonical (docs/interfaces.md): ``weight`` (+ ``bias`` for layernorm when
``use_bias_in_norms``); RMSNorm has a weight only, ScaleNorm one scalar gain ``weight``,
the non-parametric layernorm nothing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.registry import Registry

NormFactory = Callable[[Any], nn.Module]

NORMS: Registry[NormFactory] = Registry("norm", register_with="megatron.model.register_norm")


def register_norm(name: str, factory: NormFactory) -> None:
    """Make ``norm: <name>`` build ``factory(args)``, a module over the last dimension."""
    NORMS.register(name, factory)


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


class NonParametricLayerNorm(nn.Module):
    """LayerNorm without a learned scale or shift (OLMo)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), eps=self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (as Llama and NeoX)."""

    def __init__(
        self, hidden_size: int, eps: float, params_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class ScaleNorm(nn.Module):
    """g * x / max(||x||, eps) with one learned scalar g (Nguyen & Salazar 2019)."""

    def __init__(self, eps: float, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, dtype=params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps) * self.weight


def _transformer_engine(norm: str) -> Any:
    if importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(
            f"norm: {norm!r} needs NVIDIA Transformer Engine, which is not installed; use "
            f"{norm.removeprefix('te_')!r} (the same normalisation in plain PyTorch)"
        )
    import transformer_engine.pytorch as te

    return te


register_norm(
    "layernorm",
    lambda args: LayerNorm(
        args.hidden_size, args.layernorm_epsilon, args.use_bias_in_norms, args.params_dtype
    ),
)
register_norm(
    "non_parametric_layernorm",
    lambda args: NonParametricLayerNorm(args.hidden_size, args.layernorm_epsilon),
)
register_norm(
    "rmsnorm", lambda args: RMSNorm(args.hidden_size, args.rms_norm_epsilon, args.params_dtype)
)
register_norm("scalenorm", lambda args: ScaleNorm(args.scalenorm_epsilon, args.params_dtype))


def _te_layernorm(args: Any) -> nn.Module:
    te = _transformer_engine("te_layernorm")
    if not args.use_bias_in_norms:
        raise ValueError(
            "norm: 'te_layernorm' always has a bias; set use_bias_in_norms true or use 'layernorm'"
        )
    return te.LayerNorm(
        args.hidden_size, eps=args.layernorm_epsilon, params_dtype=args.params_dtype
    )


register_norm("te_layernorm", _te_layernorm)
register_norm(
    "te_rmsnorm",
    lambda args: _transformer_engine("te_rmsnorm").RMSNorm(
        args.hidden_size, eps=args.rms_norm_epsilon, params_dtype=args.params_dtype
    ),
)


def build_norm(args: Any) -> nn.Module:
    return NORMS.get(args.norm, key="norm")(args)
