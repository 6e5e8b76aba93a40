"""Autograd-aware communication at the edges of tensor-parallel regions.

Each function is the identity when the tensor-parallel group has one rank. The sequence-parallel
ones cut activations [b, s, h] along the sequence (dimension 1): between tensor-parallel regions
each rank holds s / tp positions (Korthikanti et al. 2022).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.mpu.initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_subgroup,
    get_tensor_model_parallel_world_size,
)

# torch 2.13 renamed the single-tensor collectives (the old names still work there, with a
# deprecation warning); older releases have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    # Reduce a copy: autograd may still hold the input for another consumer.
    out = x.clone()
    dist.all_reduce(out, group=get_tensor_model_parallel_group())
    return out


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if x.size(-1) % world != 0:
        raise ValueError(f"last dimension {x.size(-1)} is not divisible by the TP size {world}")
    return x.chunk(world, dim=-1)[get_tensor_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, x, group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


SEQUENCE_DIM = 1


def _sequence_world(x: torch.Tensor) -> int:
    world = get_tensor_model_parallel_world_size()
    if x.size(SEQUENCE_DIM) % world != 0:
        raise ValueError(
            f"sequence length {x.size(SEQUENCE_DIM)} is not divisible by the TP size {world} "
            "(sequence_parallel)"
        )
    return world


def _split_sequence(x: torch.Tensor) -> torch.Tensor:
    world = _sequence_world(x)
    return x.chunk(world, dim=SEQUENCE_DIM)[get_tensor_model_parallel_rank()].contiguous()


def _gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` over `group`."""
    # Collectives work on dimension 0: move `dim` there and back.
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.size(0) * dist.get_world_size(group), *front.shape[1:]))
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `x` over `group` and keep this rank's chunk along `dim`."""
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.size(0) // dist.get_world_size(group), *front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def _gather_sequence(x: torch.Tensor) -> torch.Tensor:
    return _gather_along(x, SEQUENCE_DIM, get_tensor_model_parallel_group())


def _reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    _sequence_world(x)  # a clear error when the sequence does not split evenly
    return _reduce_scatter_along(x, SEQUENCE_DIM, get_tensor_model_parallel_group())


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _split_last_dim(grad)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel op)."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel op)."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension; gather the gradient backward."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _ScatterToRegion.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's chunk along the last dimension; split the gradient backward."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _GatherFromRegion.apply(x)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _split_sequence(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _gather_sequence(grad)


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, grad_is_partial: bool) -> torch.Tensor:
        ctx.grad_is_partial = grad_is_partial
        return _gather_sequence(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # A partial gradient (each rank's consumer used its own weight shard) is summed over
        # the ranks; either way this rank keeps its positions.
        if ctx.grad_is_partial:
            return _reduce_scatter_sequence(grad), None
        return _split_sequence(grad), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _reduce_scatter_sequence(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _gather_sequence(grad)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's positions of a replicated [b, s, h]; gather the gradient backward."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _ScatterToSequence.apply(x)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, grad_is_partial: bool = True
) -> torch.Tensor:
    """All-gather the sequence; backward, reduce-scatter the gradient (the input of a
    column-parallel op, whose gradient is partial on each rank), or only split it when
    ``grad_is_partial`` is False (the consumer already sums it over the ranks)."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _GatherFromSequence.apply(x, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum partial outputs and keep this rank's positions (output of a row-parallel op);
    all-gather the gradient backward."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _ReduceScatterToSequence.apply(x)


class _GatherFromSubgroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _gather_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_along(grad, -1, ctx.group), None


def gather_from_tensor_parallel_subgroup(x: torch.Tensor, size: int) -> torch.Tensor:
    """Concatenate the last dimension over `size` consecutive tensor-parallel ranks (they
    share a replicated key/value head, each holding a part of its channels); backward sums
    the gradient over those ranks, each keeping its part (a reduce-scatter)."""
    if size == 1:
        return x
    return _GatherFromSubgroup.apply(x, get_tensor_model_parallel_subgroup(size))


def reduce_gradients_across_tensor_parallel(params) -> None:
    """Sum these replicated parameters' gradients over the tensor-parallel group.

    Under sequence parallelism a replicated weight (a norm, a row-parallel bias) sees only this
    rank's positions, so its gradient is partial on every rank.
    """
    if get_tensor_model_parallel_world_size() == 1:
        return
    for param in params:
        param.register_hook(_all_reduce)
