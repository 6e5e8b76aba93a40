"""The position-wise feed-forward block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megatron.model.activations import get_activation
from megatron.mpu.layers import ColumnParallelLinear, InitMethod, RowParallelLinear


class MLP(nn.Module):
    """h -> intermediate (column-parallel) -> activation -> h (row-parallel)."""

    def __init__(self, args: Any, init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__()
        intermediate = args.intermediate_size or 4 * args.hidden_size
        self.activation = get_activation(args.activation)
        self.dense_h_to_4h = ColumnParallelLinear(
            args.hidden_size,
            intermediate,
            init_method=init_method,
            bias=args.use_bias_in_mlp,
            gather_output=False,
            params_dtype=args.params_dtype,
        )
        self.dense_4h_to_h = RowParallelLinear(
            intermediate,
            args.hidden_size,
            init_method=output_init_method,
            bias=args.use_bias_in_mlp,
            input_is_parallel=True,
            params_dtype=args.params_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))
