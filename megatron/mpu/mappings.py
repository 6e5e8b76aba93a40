"""Autograd-aware communication at the edges of tensor-parallel regions.

Each function is the identity when the tensor-parallel group has one rank. The sequence-parallel
ones cut activations [b, s, h] along the sequence (dimension 1): between tensor-parallel regions
each rank holds s / tp positions (Korthikanti et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable

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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _edge(
    forward: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], torch.Tensor],
    doc: str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tensor-parallel region's edge: ``forward`` on the activation, ``backward`` on its
    gradient; the identity when the tensor-parallel group has one rank."""

    class Edge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            return forward(x)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            return backward(grad)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x if get_tensor_model_parallel_world_size() == 1 else Edge.apply(x)

    apply.__doc__ = doc
    return apply


copy_to_tensor_model_parallel_region = _edge(
    _identity,
    _all_reduce,
    "Identity forward; all-reduce of the gradient backward (input of a column-parallel op).",
)
reduce_from_tensor_model_parallel_region = _edge(
    _all_reduce, _identity, "All-reduce forward; identity backward (output of a row-parallel op)."
)
scatter_to_tensor_model_parallel_region = _edge(
    _split_last_dim,
    _gather_last_dim,
    "Keep this rank's chunk of the last dimension; gather the gradient backward.",
)
gather_from_tensor_model_parallel_region = _edge(
    _gather_last_dim,
    _split_last_dim,
    "Concatenate every rank's chunk along the last dimension; split the gradient backward.",
)
scatter_to_sequence_parallel_region = _edge(
    _split_sequence,
    _gather_sequence,
    "Keep this rank's positions of a replicated [b, s, h]; gather the gradient backward.",
)
reduce_scatter_to_sequence_parallel_region = _edge(
    _reduce_scatter_sequence,
    _gather_sequence,
    "Sum partial outputs and keep this rank's positions (output of a row-parallel op); "
    "all-gather the gradient backward.",
)
# All-gather the sequence. The gradient of a column-parallel op's input is partial on each rank
# (each used its own weight shard): it is summed over the ranks, each keeping its positions.
_gather_sequence_reduce_scatter_grad = _edge(
    _gather_sequence, _reduce_scatter_sequence, "All-gather forward; reduce-scatter backward."
)
_gather_sequence_split_grad = _edge(
    _gather_sequence, _split_sequence, "All-gather forward; split backward."
)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, grad_is_partial: bool = True
) -> torch.Tensor:
    """All-gather the sequence; backward, reduce-scatter the gradient (the input of a
    column-parallel op, whose gradient is partial on each rank), or only split it when
    ``grad_is_partial`` is False (the consumer already sums it over the ranks)."""
    if grad_is_partial:
        return _gather_sequence_reduce_scatter_grad(x)
    return _gather_sequence_split_grad(x)


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
