"""Checkpoints of a pipeline: global rank 0 writes every stage's full tensors.

Each stage gathers its own parameters to full tensors (collectives within the stage) and its
first rank sends them, one at a time, to global rank 0; without a pipeline nothing moves.
Kept apart from megatron/model/pipeline.py so that reading checkpoints needs no DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.initialize import device

TensorEntry = tuple[str, torch.dtype, tuple[int, ...]]


def pipeline_entries(
    local: list[TensorEntry],
) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """(name, dtype, full shape, owning pipeline stage) of the whole model, stage by stage, from
    each stage's ``local`` entries (a collective over all ranks when pipelined)."""
    if mpu.get_pipe_parallel_world_size() == 1:
        return [(*entry, 0) for entry in local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mpu.get_pipe_parallel_rank(), local))
    entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int]] = {}
    for stage, stage_entries in sorted(gathered, key=lambda item: item[0]):
        for name, dtype, shape in stage_entries:
            entries.setdefault(name, (name, dtype, tuple(shape), stage))
    return list(entries.values())


def to_first_rank(
    tensor: torch.Tensor | None, stage: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """Global rank 0 gets ``tensor`` (the full value every rank of ``stage`` holds) from that
    stage's first rank; other ranks get their argument back."""
    if stage == 0:
        return tensor
    sender = stage * dist.get_world_size() // mpu.get_pipe_parallel_world_size()
    rank = dist.get_rank()
    if rank == sender:
        dist.send(tensor.contiguous(), dst=0)
    elif rank == 0:
        received = torch.empty(shape, dtype=dtype, device=device())
        dist.recv(received, src=sender)
        return received
    return tensor
