"""Weight initialisation registry (NeoX's ``init_method`` / ``output_layer_init_method`` keys).

A factory takes the NeoX arguments and returns an in-place init function for one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

InitMethod = Callable[[torch.Tensor], torch.Tensor]
InitMethodFactory = Callable[[Any], InitMethod]

INIT_METHODS: dict[str, InitMethodFactory] = {}


def register_init_method(name: str, factory: InitMethodFactory) -> None:
    INIT_METHODS[name] = factory


def _normal(std: float) -> InitMethod:
    return partial(nn.init.normal_, mean=0.0, std=std)


register_init_method("normal", lambda args: _normal(args.init_method_std))
register_init_method(
    "scaled_normal", lambda args: _normal(args.init_method_std / math.sqrt(2.0 * args.num_layers))
)
# Nguyen & Salazar (2019), "Transformers without Tears".
register_init_method("small_init", lambda args: _normal(math.sqrt(2.0 / (5.0 * args.hidden_size))))
# GPT-J / GPT-NeoX-20B output-layer init.
register_init_method(
    "wang_init", lambda args: _normal(2.0 / args.num_layers / math.sqrt(args.hidden_size))
)
register_init_method("xavier_uniform", lambda args: nn.init.xavier_uniform_)
register_init_method("xavier_normal", lambda args: nn.init.xavier_normal_)
register_init_method("orthogonal", lambda args: partial(nn.init.orthogonal_, gain=math.sqrt(2.0)))
register_init_method(
    "scaled_orthogonal",
    lambda args: partial(nn.init.orthogonal_, gain=math.sqrt(2.0 / args.num_layers)),
)


def build_init_method(args: Any, key: str) -> InitMethod:
    """The init function named by args.<key> (``init_method`` or ``output_layer_init_method``)."""
    name = getattr(args, key)
    if name not in INIT_METHODS:
        raise ValueError(
            f"{key}: unknown init method {name!r}; expected one of {sorted(INIT_METHODS)}"
        )
    return INIT_METHODS[name](args)
