"""Process groups of the tensor x pipeline x data parallel grid.

Ranks are laid out in DeepSpeed's topology order (pipe, data, model) with the tensor-parallel
("model") axis varying fastest, so tensor-parallel peers share a node and the groups built here
match the ones DeepSpeed's ``PipeModelDataParallelTopology`` hands to its pipeline engine.

Without ``torch.distributed`` the getters describe a single process (size 1, rank 0), so the
model runs unchanged in a plain Python session.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup

_TENSOR_GROUP: ProcessGroup | None = None
_DATA_GROUP: ProcessGroup | None = None
_PIPE_GROUP: ProcessGroup | None = None
# Runs of `size` consecutive tensor-parallel ranks, keyed by size (1 < size < tp): the ranks
# that share a key/value head when there are fewer key/value heads than tensor-parallel ranks.
_TENSOR_SUBGROUPS: dict[int, ProcessGroup] = {}


def parallel_grid(world_size: int, tensor_parallel_size: int, pipe_parallel_size: int) -> dict:
    """Rank lists of every group, keyed by axis ("model", "data", "pipe").

    rank = pipe_rank * (dp * tp) + data_rank * tp + tensor_rank.
    """
    tp, pp = tensor_parallel_size, pipe_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel_size ({tp}) x "
            f"pipe_parallel_size ({pp}); expected positive sizes whose product divides it"
        )
    dp = world_size // (tp * pp)

    def rank(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    return {
        "model": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "data": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pipe": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
    }


def initialize_model_parallel(
    tensor_parallel_size: int = 1, pipe_parallel_size: int = 1, timeout: timedelta | None = None
) -> None:
    """Build this process's tensor, data and pipeline groups; every rank must call it.
    ``timeout``: how long their collectives wait (None: torch's default)."""
    global _TENSOR_GROUP, _DATA_GROUP, _PIPE_GROUP, _TENSOR_SUBGROUPS
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed to be initialised")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialised")
    grid = parallel_grid(dist.get_world_size(), tensor_parallel_size, pipe_parallel_size)
    me = dist.get_rank()
    mine: dict[str, ProcessGroup] = {}
    # new_group is collective: every rank creates every group, in the same order.
    for axis in ("model", "data", "pipe"):
        for ranks in grid[axis]:
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine[axis] = group
    _TENSOR_GROUP, _DATA_GROUP, _PIPE_GROUP = mine["model"], mine["data"], mine["pipe"]
    # Every proper divisor of tp: which one a model needs is known only when it is built, and
    # pipeline stages build different layers, so no stage could create a group on its own.
    _TENSOR_SUBGROUPS = {}
    for size in range(2, tensor_parallel_size):
        if tensor_parallel_size % size:
            continue
        for ranks in grid["model"]:
            for start in range(0, len(ranks), size):
                group = dist.new_group(ranks[start : start + size], timeout=timeout)
                if me in ranks[start : start + size]:
                    _TENSOR_SUBGROUPS[size] = group


def model_parallel_is_initialized() -> bool:
    return _TENSOR_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget the groups (tests build several layouts in one process)."""
    global _TENSOR_GROUP, _DATA_GROUP, _PIPE_GROUP, _TENSOR_SUBGROUPS
    _TENSOR_GROUP = _DATA_GROUP = _PIPE_GROUP = None
    _TENSOR_SUBGROUPS = {}


def _group(group: ProcessGroup | None) -> ProcessGroup | None:
    if group is None and dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is initialised but the model parallel groups are not: "
            "call megatron.mpu.initialize_model_parallel first"
        )
    return group


def _size(group: ProcessGroup | None) -> int:
    return 1 if _group(group) is None else dist.get_world_size(group)


def _rank(group: ProcessGroup | None) -> int:
    return 0 if _group(group) is None else dist.get_rank(group)


def get_tensor_model_parallel_group() -> ProcessGroup | None:
    return _group(_TENSOR_GROUP)


def get_tensor_model_parallel_world_size() -> int:
    return _size(_TENSOR_GROUP)


def get_tensor_model_parallel_rank() -> int:
    return _rank(_TENSOR_GROUP)


def get_tensor_model_parallel_subgroup(size: int) -> ProcessGroup | None:
    """The group of `size` consecutive tensor-parallel ranks holding this one (`size` divides
    the tensor-parallel size; the whole tensor-parallel group when equal)."""
    tp = get_tensor_model_parallel_world_size()
    if size < 1 or tp % size:
        raise ValueError(
            f"a subgroup of {size} ranks does not divide the tensor-parallel size {tp}"
        )
    if size == tp:
        return get_tensor_model_parallel_group()
    return _TENSOR_SUBGROUPS[size]


def sequence_parallel_is_on(args) -> bool:
    """Whether activations between tensor-parallel regions are split along the sequence."""
    return bool(args.sequence_parallel) and get_tensor_model_parallel_world_size() > 1


def get_data_parallel_group() -> ProcessGroup | None:
    return _group(_DATA_GROUP)


def get_data_parallel_world_size() -> int:
    return _size(_DATA_GROUP)


def get_data_parallel_rank() -> int:
    return _rank(_DATA_GROUP)


def get_pipe_parallel_group() -> ProcessGroup | None:
    return _group(_PIPE_GROUP)


def get_pipe_parallel_world_size() -> int:
    return _size(_PIPE_GROUP)


def get_pipe_parallel_rank() -> int:
    return _rank(_PIPE_GROUP)


# DeepSpeed's names (deepspeed.initialize(mpu=megatron.mpu)): without a pipeline engine its
# "model parallel" group is the tensor-parallel one, over which it sums gradient norms.


def get_model_parallel_group() -> ProcessGroup | None:
    return get_tensor_model_parallel_group()


def get_model_parallel_world_size() -> int:
    return get_tensor_model_parallel_world_size()


def get_model_parallel_rank() -> int:
    return get_tensor_model_parallel_rank()
