"""The logical matrices of a weight, whatever the tensor-parallel layout.

Muon orthogonalises each logical matrix whole: the fused QKV weight is three (all query heads,
all key heads, all value heads) and a gated MLP's first weight two (gate, up).
``mark_logical_matrices`` records their rows in the full (TP=1) tensor on the weight;
``full_tensor`` gathers a tensor-parallel slice and ``local_slice`` cuts this rank's slice again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron import mpu
from megatron.checkpoint.parameters import full_shape, is_tensor_parallel_split
from megatron.model.attention import SelfAttention
from megatron.model.mlp import MLP
from megatron.mpu.layers import merge_partitions, split_partition


def mark_logical_matrices(model: nn.Module) -> None:
    """Set ``weight.logical_rows`` (row indices of each logical matrix in the full tensor) on
    the fused weights; a weight without it is one matrix."""
    for module in model.modules():
        if isinstance(module, SelfAttention):
            weight = module.query_key_value.weight
            rows = torch.arange(full_shape(weight)[0])
            # Per key/value group: its query heads, its key head, its value head.
            grouped = rows.view(-1, module.group + 2, module.head_dim)
            weight.logical_rows = (
                grouped[:, : module.group].flatten(),
                grouped[:, module.group].flatten(),
                grouped[:, module.group + 1].flatten(),
            )
        elif isinstance(module, MLP) and module.gated:
            weight = module.dense_h_to_4h.weight
            gate, up = torch.arange(full_shape(weight)[0]).chunk(2)
            weight.logical_rows = (gate, up)


def logical_rows(p: nn.Parameter) -> list[torch.Tensor]:
    """Row indices of each logical matrix in ``p``'s full tensor."""
    rows = getattr(p, "logical_rows", None)
    return list(rows) if rows is not None else [torch.arange(full_shape(p)[0])]


def full_tensor(p: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """The full tensor of which ``local`` (shaped like ``p``) is this rank's slice."""
    if not is_tensor_parallel_split(p):
        return local
    world = mpu.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
    order = getattr(p, "partition_order", None)
    return merge_partitions(parts, p.partition_dim, getattr(p, "partition_stride", 1), order)


def local_slice(p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full``, shaped like ``p``."""
    if not is_tensor_parallel_split(p):
        return full
    return split_partition(
        full,
        p.partition_dim,
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_rank(),
        getattr(p, "partition_stride", 1),
        getattr(p, "partition_order", None),
    )
