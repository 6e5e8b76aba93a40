"""How attention heads are split across tensor-parallel ranks.

The fused QKV rows are grouped per key/value head: [kv_heads, heads_per_kv + 2, head_dim] (the
group's query heads, then its key, then its value), so splitting the rows gives each rank whole
groups. With fewer key/value heads than ranks, the ranks sharing a head each hold its query
heads' share and part of its key and value channels (the rows are cut after a permutation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.mpu.initialize import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def kv_replicas(kv_heads: int, heads: int, head_dim: int, tp: int) -> int:
    """How many tensor-parallel ranks share each key/value head: 1 when every rank holds whole
    key/value groups, tp / kv_heads when there are fewer key/value heads than ranks (each of
    those ranks then holds 1/replicas of the shared head's channels); a clear error otherwise."""
    if kv_heads % tp == 0:
        return 1
    replicas = tp // kv_heads
    if tp % kv_heads or heads % tp or head_dim % replicas:
        raise ValueError(
            f"num_kv_heads ({kv_heads}) and the tensor-parallel size ({tp}) must divide one "
            f"another; with fewer key/value heads than ranks, num_attention_heads ({heads}) "
            f"must be divisible by the tensor-parallel size and head_dim ({head_dim}) by the "
            f"ranks sharing a key/value head ({max(replicas, 1)})"
        )
    return replicas


def replicated_kv_row_order(kv_heads: int, group: int, head_dim: int, replicas: int):
    """The fused QKV rows in rank order when `replicas` ranks share each key/value head: rank
    g * replicas + j holds key/value group g's query heads j * group / replicas onwards, then
    part j of the group's key rows and part j of its value rows."""
    rows = torch.arange(kv_heads * (group + 2) * head_dim).view(kv_heads, group + 2, head_dim)
    heads, channels = group // replicas, head_dim // replicas
    order = []
    for g in range(kv_heads):
        for j in range(replicas):
            part = slice(j * channels, (j + 1) * channels)
            order += [rows[g, j * heads : (j + 1) * heads].flatten(), rows[g, group, part]]
            order.append(rows[g, group + 1, part])
    return torch.cat(order)


@dataclass(frozen=True)
class HeadPartition:
    """This rank's share of the heads."""

    heads: int  # query heads
    kv_heads: int  # key/value heads (a shared one counts once)
    kv_replicas: int  # ranks sharing each key/value head
    first_head: int  # the global index of this rank's first query head
    row_order: torch.Tensor | None  # the fused QKV rows before the split (None: as they are)


def partition_heads(heads: int, kv_heads: int, head_dim: int) -> HeadPartition:
    tp = get_tensor_model_parallel_world_size()
    replicas = kv_replicas(kv_heads, heads, head_dim, tp)
    local = heads // tp
    row_order = None
    if replicas > 1:
        row_order = replicated_kv_row_order(kv_heads, heads // kv_heads, head_dim, replicas)
    return HeadPartition(
        heads=local,
        kv_heads=max(kv_heads // tp, 1),
        kv_replicas=replicas,
        first_head=get_tensor_model_parallel_rank() * local,
        row_order=row_order,
    )
