"""The position-wise feed-forward block, plain or gated (GLU family)."""

from __future__ import annotations

import torch
from torch import nn

from megatron.model.activations import get_activation, is_gated
from megatron.model.config import ModelConfig
from megatron.mpu.layers import ColumnParallelLinear, InitMethod, RowParallelLinear


class MLP(nn.Module):
    """h -> intermediate (column-parallel) -> activation -> h (row-parallel).

    ``ffn_hidden_size`` is the activation width (NeoX's rule: ``ffn_sizes``). A gated
    activation's first projection holds ``[gate; up]`` (each ``ffn_hidden_size`` rows) and the
    block computes
    ``dense_4h_to_h(act(gate) * up)``; under tensor parallelism each rank holds its slice of both
    halves (stride 2), so the product needs no communication.
    """

    def __init__(
        self, config: ModelConfig, init_method: InitMethod, output_init_method: InitMethod
    ) -> None:
        super().__init__()
        width = config.ffn_hidden_size
        self.activation = get_activation(config.activation)
        self.gated = is_gated(config.activation)
        projection = 2 * width if self.gated else width
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size,
            projection,
            init_method=init_method,
            bias=config.use_bias_in_mlp,
            gather_output=False,
            params_dtype=config.params_dtype,
            stride=2 if self.gated else 1,
        )
        self.dense_4h_to_h = RowParallelLinear(
            width,
            config.hidden_size,
            init_method=output_init_method,
            bias=config.use_bias_in_mlp,
            input_is_parallel=True,
            params_dtype=config.params_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return self.dense_4h_to_h(h)
