"""What this process holds of each parameter: its canonical name, its full shape, its
tensor-parallel slice, and which flat ranges of that slice it writes to a checkpoint (so that
across the job every value is written exactly once)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.checkpoint.boxes import TensorParallelSlice

TensorEntry = tuple[str, torch.dtype, tuple[int, ...]]


def canonical_named_parameters(
    module: torch.nn.Module, replicas: bool = True
) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for each parameter this process holds: the names of
    GPTModel(config).state_dict() at TP=1. named_parameters() lists a tied weight once, under
    its first (canonical) name; a pipeline stage maps DeepSpeed's names itself
    (``canonical_named_parameters``), and ``replicas=False`` leaves out the last stage's copy of
    a tied embedding."""
    pipeline_names = getattr(module, "canonical_named_parameters", None)
    if pipeline_names is not None:
        return pipeline_names(replicas)
    return list(module.named_parameters())


def is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def is_tensor_parallel_split(p: torch.nn.Parameter) -> bool:
    return (
        getattr(p, "partition_dim", None) is not None
        and mpu.get_tensor_model_parallel_world_size() > 1
    )


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape at TP=1 without ZeRO-3 partitioning."""
    shape = list(p.ds_shape if is_zero3(p) else p.shape)
    if is_tensor_parallel_split(p):
        shape[p.partition_dim] *= mpu.get_tensor_model_parallel_world_size()
    return tuple(shape)


def tensor_parallel_slice(p: torch.nn.Parameter) -> TensorParallelSlice:
    """Where this rank's slice of `p` lies in the full tensor."""
    shape = full_shape(p)
    if not is_tensor_parallel_split(p):
        return TensorParallelSlice.unsplit(shape)
    return TensorParallelSlice.of_rank(
        shape,
        p.partition_dim,
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_rank(),
        getattr(p, "partition_stride", 1),
        getattr(p, "partition_order", None),
    )


def writes_tensor_parallel_copy(p: torch.nn.Parameter) -> bool:
    """Each tensor-parallel rank writes its own slice; a weight every rank holds whole (a norm,
    a bias after a row-parallel layer), only the first."""
    return is_tensor_parallel_split(p) or mpu.get_tensor_model_parallel_rank() == 0


def data_parallel_share(numel: int) -> tuple[int, int]:
    """The flat range this data-parallel rank writes of a tensor all of them hold."""
    rank, world = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    return numel * rank // world, numel * (rank + 1) // world


def zero3_partition(p: torch.nn.Parameter, local: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(start, values) of this rank's ZeRO-3 partition `local` of `p`'s flat slice, without
    the padding of the last partition."""
    size = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    valid = max(0, min(size, p.ds_numel - start))
    return start, local.reshape(-1)[:valid]


def weight_fragment(p: torch.nn.Parameter) -> tuple[int, torch.Tensor]:
    """(start, flat values) of `p`'s weight this rank holds alone: its ZeRO-3 partition, or
    its data-parallel share of the slice every data-parallel rank holds."""
    if is_zero3(p):
        return zero3_partition(p, p.ds_tensor.detach())
    start, end = data_parallel_share(p.numel())
    return start, p.detach().reshape(-1)[start:end]


def model_entries(local: list[TensorEntry]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, full shape) of the whole model from each pipeline stage's ``local``
    entries, stage by stage (a collective over all ranks when pipelined)."""
    if mpu.get_pipe_parallel_world_size() == 1:
        return list(local)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mpu.get_pipe_parallel_rank(), local))
    entries: dict[str, TensorEntry] = {}
    for _, stage_entries in sorted(gathered, key=lambda item: item[0]):
        for name, dtype, shape in stage_entries:
            entries.setdefault(name, (name, dtype, tuple(shape)))
    return list(entries.values())
