"""The position-wise feed-forward block, plain or gated (GLU family)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megatron.model.activations import get_activation, is_gated
from megatron.mpu.initialize import sequence_parallel_is_on
from megatron.mpu.layers import ColumnParallelLinear, InitMethod, RowParallelLinear
from megatron.neox_arguments.sizes import ffn_sizes


class MLP(nn.Module):
    """h -> intermediate (column-parallel) -> activation -> h (row-parallel).

    Widths follow NeoX's rule (``ffn_sizes``). A gated activation's first projection holds
    ``[gate; up]`` (each ``ffn_hidden_size`` rows) and the block computes
    ``dense_4h_to_h(act(gate) * up)``; under tensor parallelism each rank holds its slice of both
    halves (stride 2), so the product needs no communication.
    """

    def __init__(self, args: Any, init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__()
        projection, width = ffn_sizes(args)
        self.activation = get_activation(args.activation)
        self.gated = is_gated(args.activation)
        self.dense_h_to_4h = ColumnParallelLinear(
            args.hidden_size,
            projection,
            init_method=init_method,
            bias=args.use_bias_in_mlp,
            gather_output=False,
            params_dtype=args.params_dtype,
            stride=2 if self.gated else 1,
            sequence_parallel=sequence_parallel_is_on(args),
        )
        self.dense_4h_to_h = RowParallelLinear(
            width,
            args.hidden_size,
            init_method=output_init_method,
            bias=args.use_bias_in_mlp,
            input_is_parallel=True,
            params_dtype=args.params_dtype,
            sequence_parallel=sequence_parallel_is_on(args),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return self.dense_4h_to_h(h)
