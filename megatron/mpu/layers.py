"""Megatron-style tensor-parallel layers.

Every rank initialises the FULL weight with the init method (in fp32, on the CPU, from the
same generator state) and keeps its own slice, so the values of a weight never depend on the
tensor-parallel layout. Split parameters carry a ``partition_dim`` attribute (the dimension
cut across tensor-parallel ranks) and a ``partition_stride`` (how many blocks along that dimension
are split separately, Megatron-style: a gated MLP's ``[gate; up]`` rows have stride 2, so each
rank holds ``[gate_r; up_r]``); the checkpoint code gathers them with ``merge_partitions``.
A ``partition_order`` (an index along ``partition_dim``) permutes the full tensor before it is
cut: attention with fewer key/value heads than ranks gives each rank part of a shared head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron.mpu.initialize import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from megatron.mpu.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_gradients_across_tensor_parallel,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})"
        )
    return numerator // denominator


def split_partition(
    full: torch.Tensor,
    dim: int,
    world: int,
    rank: int,
    stride: int = 1,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full``: ``full`` (reordered along ``dim`` by ``order``) is cut
    into ``stride`` blocks along ``dim`` and each block into ``world`` chunks; the rank holds
    its chunk of every block, in order."""
    if order is not None:
        full = full.index_select(dim, order)
    size = full.size(dim)
    if size % (world * stride):
        blocks = f" x {stride} blocks" if stride > 1 else ""
        raise ValueError(
            f"dimension {dim} of a {tuple(full.shape)} weight ({size}) must be divisible by the "
            f"tensor-parallel size ({world}){blocks}"
        )
    chunks = full.chunk(world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def merge_partitions(
    parts: list[torch.Tensor], dim: int, stride: int = 1, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of ``split_partition``: the full tensor from every rank's slice (rank order)."""
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    merged = torch.cat([pieces_r[block] for block in range(stride) for pieces_r in pieces], dim)
    if order is None:
        return merged
    return torch.empty_like(merged).index_copy_(dim, order, merged)


def partitioned_parameter(
    full_shape: tuple[int, ...],
    partition_dim: int | None,
    init_method: InitMethod,
    params_dtype: torch.dtype,
    stride: int = 1,
    order: torch.Tensor | None = None,
) -> nn.Parameter:
    """This rank's slice (on ``partition_dim``; None: all) of a fully initialised tensor."""
    full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(full)
    if partition_dim is None:
        return nn.Parameter(full.to(params_dtype))
    part = split_partition(
        full,
        partition_dim,
        get_tensor_model_parallel_world_size(),
        get_tensor_model_parallel_rank(),
        stride,
        order,
    )
    param = nn.Parameter(torch.empty(part.shape, dtype=params_dtype).copy_(part))
    param.partition_dim = partition_dim
    param.partition_stride = stride
    if order is not None:
        param.partition_order = order
    # DeepSpeed's gradient clipping counts such parameters on every tensor-parallel rank and
    # replicated ones on the first only (deepspeed.runtime.utils.is_model_parallel_parameter).
    param.tensor_model_parallel = True
    return param


def _zero_bias(
    size: int,
    partition_dim: int | None,
    params_dtype: torch.dtype,
    stride: int = 1,
    order: torch.Tensor | None = None,
) -> nn.Parameter:
    return partitioned_parameter(
        (size,), partition_dim, nn.init.zeros_, params_dtype, stride, order
    )


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output dimension across tensor-parallel ranks.

    ``stride`` > 1 splits each of ``stride`` equal blocks of output rows separately (a gated
    MLP's ``[gate; up]``), so a rank's output holds its part of every block; ``gather_output``
    then returns the rank-major order, so keep it False with stride > 1; so does
    ``row_order`` (output rows reordered before they are split). With ``sequence_parallel``
    the input is this rank's positions [b, s / tp, h], gathered here.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        bias: bool = True,
        gather_output: bool = True,
        params_dtype: torch.dtype = torch.float32,
        stride: int = 1,
        row_order: torch.Tensor | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if (stride > 1 or row_order is not None) and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output needs stride 1, no row_order")
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel needs gather_output=False")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = partitioned_parameter(
            (output_size, input_size), 0, init_method, params_dtype, stride, row_order
        )
        self.bias = _zero_bias(output_size, 0, params_dtype, stride, row_order) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x)
        else:
            x = copy_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dimension; partial products are summed.

    With ``sequence_parallel`` the sum is reduce-scattered: each rank gets its positions.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        init_method: InitMethod,
        bias: bool = True,
        input_is_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = partitioned_parameter((output_size, input_size), 1, init_method, params_dtype)
        # The bias is added once, after the reduction, so every rank holds all of it.
        self.bias = _zero_bias(output_size, None, params_dtype) if bias else None
        if self.bias is not None and sequence_parallel:
            reduce_gradients_across_tensor_parallel([self.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = reduce_from_tensor_model_parallel_region(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary across tensor-parallel ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight = partitioned_parameter(
            (num_embeddings, embedding_dim), 0, init_method, params_dtype
        )
        per_rank = self.weight.size(0)
        self.vocab_start = get_tensor_model_parallel_rank() * per_rank
        self.vocab_end = self.vocab_start + per_rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)
