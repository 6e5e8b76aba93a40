"""Activation registry (NeoX's ``activation`` key).

A gated activation (GLU family) is registered with the function applied to the gate: the MLP's
first projection then has two halves ``[gate; up]`` and its output is ``fn(gate) * up``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron.neox_arguments.rules import register_names
from megatron.neox_arguments.sizes import GATED_ACTIVATIONS
from megatron.registry import Registry

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: Registry[Activation] = Registry(
    "activation", register_with="megatron.model.register_activation"
)
register_names("activation", ACTIVATIONS)


def register_activation(name: str, fn: Activation, *, gated: bool = False) -> None:
    """Make ``activation: <name>`` apply ``fn`` (to the gate half when ``gated``).

    Gated names are also recorded in ``GATED_ACTIVATIONS``, which the config package uses for the
    MLP width and parameter count.
    """
    ACTIVATIONS.register(name, fn)
    if gated:
        GATED_ACTIVATIONS.add(name)


def is_gated(name: str) -> bool:
    return name in GATED_ACTIVATIONS


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


register_activation("gelu", F.gelu)
register_activation("relu", F.relu)
register_activation("silu", F.silu)
register_activation("swish", F.silu)  # NeoX's swish uses beta = 1, which is SiLU
register_activation("mish", F.mish)
register_activation("softsign", F.softsign)
register_activation("tanh", torch.tanh)
register_activation("sigmoid", torch.sigmoid)
# GLU variants (Shazeer 2020, "GLU Variants Improve Transformer"), as NeoX defines them.
register_activation("geglu", F.gelu, gated=True)
register_activation("swiglu", F.silu, gated=True)
register_activation("reglu", F.relu, gated=True)
register_activation("glu", torch.sigmoid, gated=True)
register_activation("bilinear", _identity, gated=True)


def get_activation(name: str) -> Activation:
    return ACTIVATIONS.get(name, key="activation")
