"""Activation registry (NeoX's ``activation`` key)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Activation] = {}


def register_activation(name: str, fn: Activation) -> None:
    ACTIVATIONS[name] = fn


register_activation("gelu", F.gelu)
register_activation("relu", F.relu)
register_activation("silu", F.silu)
register_activation("swish", F.silu)  # NeoX's swish uses beta = 1, which is SiLU
register_activation("mish", F.mish)
register_activation("softsign", F.softsign)


def get_activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation: unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]
