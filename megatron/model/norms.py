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

from megatron.model.config import ModelConfig
from megatron.neox_arguments.rules import register_names
from megatron.registry import Registry

# (config, width) -> a norm over the last dimension, `width` wide.
NormFactory = Callable[[ModelConfig, int], nn.Module]

NORMS: Registry[NormFactory] = Registry("norm", register_with="megatron.model.register_norm")
register_names("norm", NORMS)


def register_norm(name: str, factory: NormFactory) -> None:
    """Make ``norm: <name>`` build ``factory(config, width)``, a module over the last dimension
    (``width`` wide: hidden_size, or one head's size for the QK norm)."""
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
    lambda config, width: LayerNorm(
        width, config.layernorm_epsilon, config.use_bias_in_norms, config.params_dtype
    ),
)
register_norm(
    "non_parametric_layernorm",
    lambda config, width: NonParametricLayerNorm(width, config.layernorm_epsilon),
)
register_norm(
    "rmsnorm",
    lambda config, width: RMSNorm(width, config.rms_norm_epsilon, config.params_dtype),
)
register_norm(
    "scalenorm", lambda config, width: ScaleNorm(config.scalenorm_epsilon, config.params_dtype)
)


def _te_layernorm(config: ModelConfig, width: int) -> nn.Module:
    te = _transformer_engine("te_layernorm")
    if not config.use_bias_in_norms:
        raise ValueError(
            "norm: 'te_layernorm' always has a bias; set use_bias_in_norms true or use 'layernorm'"
        )
    return te.LayerNorm(width, eps=config.layernorm_epsilon, params_dtype=config.params_dtype)


register_norm("te_layernorm", _te_layernorm)
register_norm(
    "te_rmsnorm",
    lambda config, width: _transformer_engine("te_rmsnorm").RMSNorm(
        width, eps=config.rms_norm_epsilon, params_dtype=config.params_dtype
    ),
)


def build_norm(config: ModelConfig, width: int | None = None) -> nn.Module:
    """The configured norm over ``width`` features (default hidden_size)."""
    return NORMS.get(config.norm, key="norm")(config, width or config.hidden_size)
