"""Megatron-style tensor-parallel layers.

A weight's values never depend on the tensor-parallel layout, and each rank computes only its
own slice: a weight takes one seed from the layer's generator, and an ``ElementwiseInit`` draws
each row (or column) along the split dimension from a generator seeded by (that seed, its
index), so a rank draws exactly its rows, whoever holds the others. Init methods whose values
depend on the whole tensor (orthogonal, xavier's fans) initialise the full tensor from the seed
and keep the slice. Split parameters carry a ``partition_dim`` attribute (the dimension
cut across tensor-parallel ranks) and a ``partition_stride`` (how many blocks along that dimension
are split separately, Megatron-style: a gated MLP's ``[gate; up]`` rows have stride 2, so each
rank holds ``[gate_r; up_r]``); the checkpoint code gathers them with ``merge_partitions``.
A ``partition_order`` (an index along ``partition_dim``) permutes the full tensor before it is
cut: attention with fewer key/value heads than ranks gives each rank part of a shared head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ElementwiseInit:
    """An init method that draws every element independently from one distribution (normal,
    zeros): any row of a tensor can be drawn without the rest."""

    fn: InitMethod

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.fn(tensor)


def _mix(seed: int, index: int) -> int:
    """A well-spread 63-bit seed for row ``index`` of the weight seeded ``seed`` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})"
        )
    return numerator // denominator


def check_divisible(shape: tuple[int, ...], dim: int, world: int, stride: int = 1) -> None:
    if shape[dim] % (world * stride):
        blocks = f" x {stride} blocks" if stride > 1 else ""
        raise ValueError(
            f"dimension {dim} of a {shape} weight ({shape[dim]}) must be divisible by the "
            f"tensor-parallel size ({world}){blocks}"
        )


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
    check_divisible(tuple(full.shape), dim, world, stride)
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
    """This rank's slice (on ``partition_dim``; None: all) of the tensor ``init_method``
    initialises, computed in fp32 on the CPU (on the meta device: its shape only). Takes one
    draw from torch's CPU generator (the layer's ``init_rng`` stream) and leaves the rest of its
    state as it was."""
    world, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if torch.get_default_device().type == "meta":
        shape = list(full_shape)
        if partition_dim is not None:
            check_divisible(full_shape, partition_dim, world, stride)
            shape[partition_dim] //= world
        part = torch.empty(shape)
    else:
        part = _initialise(full_shape, partition_dim, init_method, world, rank, stride, order)
    param = nn.Parameter(part.to(params_dtype))
    if partition_dim is None:
        return param
    param.partition_dim = partition_dim
    param.partition_stride = stride
    if order is not None:
        param.partition_order = order
    # DeepSpeed's gradient clipping counts such parameters on every tensor-parallel rank and
    # replicated ones on the first only (deepspeed.runtime.utils.is_model_parallel_parameter).
    param.tensor_model_parallel = True
    return param


def _initialise(
    full_shape: tuple[int, ...],
    dim: int | None,
    init_method: InitMethod,
    world: int,
    rank: int,
    stride: int,
    order: torch.Tensor | None,
) -> torch.Tensor:
    seed = int(torch.randint(0, 2**63 - 1, ()).item())
    with torch.random.fork_rng(devices=[]):
        if dim is None or not isinstance(init_method, ElementwiseInit):
            torch.default_generator.manual_seed(seed)
            full = torch.empty(full_shape, dtype=torch.float32)
            init_method(full)
            return full if dim is None else split_partition(full, dim, world, rank, stride, order)
        check_divisible(full_shape, dim, world, stride)
        # The indices along `dim` this rank holds, in its order.
        rows = split_partition(torch.arange(full_shape[dim]), 0, world, rank, stride, order)
        # Filled with `dim` first, so each row is drawn into contiguous memory.
        rest = [n for d, n in enumerate(full_shape) if d != dim]
        part = torch.empty([len(rows), *rest], dtype=torch.float32)
        for i, row in enumerate(rows.tolist()):
            torch.default_generator.manual_seed(_mix(seed, row))
            init_method(part[i])
        return part.movedim(0, dim).contiguous()


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
    ``row_order`` (output rows reordered before they are split). After
    ``use_sequence_parallel`` the input is this rank's positions [b, s / tp, h], gathered here.
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
    ) -> None:
        super().__init__()
        if (stride > 1 or row_order is not None) and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output needs stride 1, no row_order")
        self.gather_output = gather_output
        self.sequence_parallel = False
        self.weight = partitioned_parameter(
            (output_size, input_size), 0, init_method, params_dtype, stride, row_order
        )
        self.bias = _zero_bias(output_size, 0, params_dtype, stride, row_order) if bias else None

    def use_sequence_parallel(self) -> None:
        """Take this rank's positions [b, s / tp, h] and gather the sequence."""
        if self.gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel needs gather_output=False")
        self.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x)
        else:
            x = copy_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dimension; partial products are summed.

    After ``use_sequence_parallel`` the sum is reduce-scattered: each rank gets its positions.
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
    ) -> None:
        super().__init__()
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = False
        self.weight = partitioned_parameter((output_size, input_size), 1, init_method, params_dtype)
        # The bias is added once, after the reduction, so every rank holds all of it.
        self.bias = _zero_bias(output_size, None, params_dtype) if bias else None

    def use_sequence_parallel(self) -> None:
        """Reduce-scatter the output: each rank keeps its positions [b, s / tp, h]."""
        if not self.input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.sequence_parallel = True
        if self.bias is not None:  # it now sees only this rank's positions
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


def parallel_lm_logits(
    hidden: torch.Tensor, weight: torch.Tensor, parallel_output: bool
) -> torch.Tensor:
    """Logits from [b, s, h] and a vocabulary-parallel [vocab / tp, h] weight; with
    ``parallel_output`` each rank keeps its vocabulary shard (for vocab_parallel_cross_entropy)."""
    logits = F.linear(copy_to_tensor_model_parallel_region(hidden), weight)
    return logits if parallel_output else gather_from_tensor_model_parallel_region(logits)


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
