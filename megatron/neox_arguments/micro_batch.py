"""`train_micro_batch_size_per_gpu: auto`: the largest micro-batch that fits, accumulation making
up the rest of train_batch_size, so the global batch does not depend on the device.

The candidates are divisors of the per-rank batch (train_batch_size / data_parallel_size), each
at most half the one before (halving, rounded down to a divisor). Here the config picks by the
memory estimate; on CUDA the run probes real steps (megatron/engine/auto_batch.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from megatron.neox_arguments.batch import resolve_batch
from megatron.neox_arguments.errors import ConfigError
from megatron.neox_arguments.memory import estimate_memory, format_bytes, parse_bytes

KEY = "train_micro_batch_size_per_gpu"


def candidates(per_rank: int) -> Iterator[int]:
    """per_rank, then repeatedly the largest divisor of per_rank at most half the last one."""
    size = per_rank
    while size >= 1:
        yield size
        size = next((d for d in range(size // 2, 0, -1) if per_rank % d == 0), 0)


def largest_fitting(per_rank: int, fits: Callable[[int], bool]) -> int | None:
    """The first candidate for which ``fits`` holds; None when not even 1 fits."""
    return next((size for size in candidates(per_rank) if fits(size)), None)


def per_rank_batch(args: Any) -> int:
    return args.train_batch_size // args.data_parallel_size


def apply_micro_batch(args: Any, micro: int) -> None:
    """Set the micro-batch and derive the accumulation steps; train_batch_size is unchanged."""
    _, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps = resolve_batch(
        args.data_parallel_size, args.train_batch_size, micro, None
    )


def memory_limit(args: Any) -> tuple[int, str]:
    """(bytes, where from): device_memory when set, else the host's available memory."""
    if args.device_memory:
        return parse_bytes(args.device_memory), f"device_memory {args.device_memory}"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available, "the host's available memory"


def size_by_estimate(args: Any) -> None:
    """Pick the micro-batch with the memory estimate against auto_batch_memory_fraction of the
    memory limit; the choice goes to `args.notes`."""
    memory, source = memory_limit(args)
    budget = memory * args.auto_batch_memory_fraction
    micro = largest_fitting(
        per_rank_batch(args), lambda size: estimate_memory(args, size).total <= budget
    )
    if micro is None:
        need = format_bytes(estimate_memory(args, 1).total)
        raise ConfigError(
            f"{KEY}: auto: not even a micro-batch of 1 fits: the estimate is {need}, the budget "
            f"{format_bytes(budget)} (auto_batch_memory_fraction {args.auto_batch_memory_fraction} "
            f"of {source})"
        )
    apply_micro_batch(args, micro)
    args.notes.append(
        f"{KEY}: auto -> {micro} (estimate {format_bytes(estimate_memory(args).total)} within "
        f"{args.auto_batch_memory_fraction:g} x {format_bytes(memory)}, {source}), "
        f"gradient_accumulation_steps {args.gradient_accumulation_steps}"
    )
