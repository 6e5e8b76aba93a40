"""Weight initialisation registry (NeoX's ``init_method`` / ``output_layer_init_method`` keys).

An entry builds an in-place init function from the NeoX arguments and the hidden width its
formula uses (``small_init`` and ``wang_init`` depend on it). Under muP the formulas are evaluated
at the base width and rescaled by the weight's muP role (see megatron/model/mup.py);
methods whose scale comes from the tensor's own shape (xavier, orthogonal) cannot be rescaled
that way and are refused with ``use_mup``, as in NeoX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from megatron.model.config import ModelConfig
from megatron.model.mup import base_width, width_multiplier
from megatron.mpu.layers import ElementwiseInit
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.rules import register_names, register_rule
from megatron.registry import Registry

InitMethod = Callable[[torch.Tensor], torch.Tensor]
# (config, width) -> init function
InitMethodBuilder = Callable[[ModelConfig, int], InitMethod]
# What a weight is to muP: an input embedding, a hidden matrix or the output layer.
Role = Literal["input", "hidden", "output"]


@dataclass(frozen=True)
class InitMethodSpec:
    build: InitMethodBuilder
    # The scale is a formula muP may evaluate at the base width, and every element is drawn
    # independently (so each tensor-parallel rank draws only its own rows).
    mup: bool


INIT_METHODS: Registry[InitMethodSpec] = Registry(
    "init method", register_with="megatron.model.register_init_method"
)
register_names("init_method", INIT_METHODS)


def register_init_method(name: str, build: InitMethodBuilder, *, mup: bool = True) -> None:
    """Make ``init_method: <name>`` use ``build(config, width)``; ``mup=False`` refuses
    use_mup."""
    INIT_METHODS.register(name, InitMethodSpec(build, mup))


def mup_init_methods() -> list[str]:
    """The registered methods muP can rescale."""
    return sorted(name for name, spec in INIT_METHODS.items() if spec.mup)


@register_rule("init_method")
def _check_mup_init(args: Any, problems: Problems) -> None:
    if not args.use_mup:
        return
    for key in ("init_method", "output_layer_init_method"):
        if not INIT_METHODS[getattr(args, key)].mup:  # the schema checked it is registered
            problems.add(
                f"{key}={getattr(args, key)!r}{args.where(key)} cannot be used with use_mup: its "
                f"scale follows the tensor's shape (use one of {mup_init_methods()})"
            )


def _normal(std: float) -> InitMethod:
    return partial(nn.init.normal_, mean=0.0, std=std)


def _scaled_normal(config: ModelConfig, residuals_per_layer: int) -> InitMethod:
    return _normal(config.init_method_std / math.sqrt(residuals_per_layer * config.num_layers))


register_init_method("normal", lambda config, width: _normal(config.init_method_std))
# GPT-2: residual outputs shrink with depth (two residual branches per layer).
register_init_method("scaled_normal", lambda config, width: _scaled_normal(config, 2))
# Mamba-style blocks have one residual branch per layer.
register_init_method(
    "single_residual_scaled_normal", lambda config, width: _scaled_normal(config, 1)
)
# Nguyen & Salazar (2019), "Transformers without Tears".
register_init_method("small_init", lambda config, width: _normal(math.sqrt(2.0 / (5.0 * width))))
# GPT-J / GPT-NeoX-20B output-layer init.
register_init_method(
    "wang_init", lambda config, width: _normal(2.0 / config.num_layers / math.sqrt(width))
)
register_init_method("xavier_uniform", lambda config, width: nn.init.xavier_uniform_, mup=False)
register_init_method("xavier_normal", lambda config, width: nn.init.xavier_normal_, mup=False)
register_init_method(
    "orthogonal", lambda config, width: partial(nn.init.orthogonal_, gain=math.sqrt(2.0)), mup=False
)
register_init_method(
    "scaled_orthogonal",
    lambda config, width: partial(nn.init.orthogonal_, gain=math.sqrt(2.0 / config.num_layers)),
    mup=False,
)


def _times(init: InitMethod, factor: float) -> InitMethod:
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        init(tensor)
        with torch.no_grad():
            return tensor.mul_(factor)

    return init_


def build_init_method(config: ModelConfig, key: str, role: Role = "hidden") -> InitMethod:
    """The init function named by config.<key> (``init_method`` or ``output_layer_init_method``)
    for a weight of the given muP ``role``."""
    name = getattr(config, key)
    spec = INIT_METHODS.get(name, key=key)
    if not config.use_mup:
        init = spec.build(config, config.hidden_size)
        return ElementwiseInit(init) if spec.mup else init
    if not spec.mup:
        raise ValueError(
            f"{key}: {name!r} cannot be used with use_mup (its scale follows the tensor's shape, "
            f"not a width muP can rescale); use one of {mup_init_methods()}"
        )
    # Hidden matrices: std / sqrt(m). The output layer, whose logits are divided by m: std x
    # sqrt(m), so the logits start at the standard parametrisation's scale (as the mup package's
    # MuReadout). Input weights: the base model's std.
    factor = config.mup_init_scale
    if role == "hidden":
        factor /= math.sqrt(width_multiplier(config))
    elif role == "output":
        factor *= math.sqrt(width_multiplier(config))
    init = spec.build(config, base_width(config))
    return ElementwiseInit(init if factor == 1.0 else _times(init, factor))
