"""`train_micro_batch_size_per_gpu: auto` on CUDA: probe forward and backward of a full-size
micro-batch on the real model, halving on out-of-memory, before the train step is built.

The config already picked a size by the memory estimate (megatron/neox_arguments/micro_batch.py);
here the device decides. A size fits when the probe's peak allocation plus the optimizer state
still to be allocated (the estimate's exact term) stays within auto_batch_memory_fraction of the
device. Every rank probes the same sizes and the ranks agree on each answer, so the layout's
collectives stay in step. Pipelines keep the estimate's choice: a stage cannot run alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.engine.parallelize import parallelize
from megatron.logging import print_rank_0
from megatron.model import ModelConfig, build_model
from megatron.mpu.random import get_rng_tracker
from megatron.neox_arguments.memory import estimate_memory, format_bytes
from megatron.neox_arguments.micro_batch import (
    KEY,
    apply_micro_batch,
    largest_fitting,
    per_rank_batch,
)


def probe_peak(model: torch.nn.Module, args: Any, device: torch.device, micro: int) -> int:
    """Peak bytes allocated by one forward and backward of ``micro`` samples (random tokens:
    memory depends on the shapes alone); raises torch.cuda.OutOfMemoryError."""
    torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.randint(0, args.padded_vocab_size, (micro, args.seq_length), device=device)
    try:
        loss = mpu.vocab_parallel_cross_entropy(model(tokens), tokens).mean()
        loss.backward()
        return torch.cuda.max_memory_allocated(device)
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def pick_micro_batch(args: Any, total_memory: int, peak: Callable[[int], int]) -> int | None:
    """The largest candidate micro-batch whose ``peak(micro)`` plus the optimizer state fits in
    auto_batch_memory_fraction of ``total_memory`` on every rank; None when none does."""
    budget = total_memory * args.auto_batch_memory_fraction
    optimizer_state = estimate_memory(args).optimizer

    def fits(micro: int) -> bool:
        try:
            ok = peak(micro) + optimizer_state <= budget
        except torch.cuda.OutOfMemoryError:
            ok = False
        return _all_ranks(ok)

    return largest_fitting(per_rank_batch(args), fits)


def _all_ranks(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _probe_model(args: Any, device: torch.device, total: int) -> int | None:
    model = parallelize(
        build_model(ModelConfig.from_neox(args), parallel_output=True).to(device),
        args.sequence_parallel,
    )
    # The probe's dropout draws must not shift the run's random streams.
    tracker = get_rng_tracker()
    states = tracker.get_states()
    with torch.random.fork_rng(devices=[device]):
        try:
            return pick_micro_batch(args, total, lambda size: probe_peak(model, args, device, size))
        finally:
            tracker.set_states(states)


def size_micro_batch_on_device(args: Any, device: torch.device) -> None:
    """Probe and set the micro-batch (and the accumulation steps) for this CUDA device."""
    if args.pipe_parallel_size >= 2:
        print_rank_0(
            f"{KEY}: auto: pipelines keep the estimate's {args.train_micro_batch_size_per_gpu}"
        )
        return
    total = torch.cuda.get_device_properties(device).total_memory
    # Allocations past the budget fail as they would on a device of that size.
    torch.cuda.set_per_process_memory_fraction(args.auto_batch_memory_fraction, device)
    try:
        micro = _probe_model(args, device, total)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()  # the probe's model is gone: give its memory back
    if micro is None:
        raise RuntimeError(
            f"{KEY}: auto: not even a micro-batch of 1 fits in auto_batch_memory_fraction "
            f"{args.auto_batch_memory_fraction} of {format_bytes(total)}"
        )
    apply_micro_batch(args, micro)
    print_rank_0(
        f"{KEY}: auto -> {micro} (probed on {torch.cuda.get_device_name(device)}, "
        f"{args.auto_batch_memory_fraction:g} x {format_bytes(total)}), "
        f"gradient_accumulation_steps {args.gradient_accumulation_steps}, train_batch_size "
        f"{args.train_batch_size}"
    )
