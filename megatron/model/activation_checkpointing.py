"""Activation checkpointing: recompute transformer blocks in the backward pass.

Both the sequential model and the pipeline stages use DeepSpeed's ``checkpoint`` (which saves
and restores the RNG states, so dropout draws the same masks when a block is recomputed); the
train step (megatron/engine/step.py) configures it from the NeoX keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron.mpu.random import get_rng_tracker


def checkpointed(
    run: Callable[..., torch.Tensor], hidden: torch.Tensor, *inputs: torch.Tensor | None
) -> torch.Tensor:
    """``run(hidden, *inputs)``, keeping only its inputs and recomputing it in the backward.

    DeepSpeed restores the default generators for the recomputation; the tensor-parallel
    dropout stream (mpu's RNG tracker) is restored here, and put back afterwards so the
    recomputation does not rewind it.
    """
    import deepspeed

    tracker = get_rng_tracker()
    start = tracker.get_states()
    calls = 0
    # Only tensors go through DeepSpeed: with partition_activations it saves each argument
    # next to its size and loses that pairing on a None (a missing mask or position ids).
    given = [i for i, value in enumerate(inputs) if value is not None]

    def replay(x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        args: list[torch.Tensor | None] = [None] * len(inputs)
        for i, tensor in zip(given, tensors, strict=True):
            args[i] = tensor
        if calls == 1:  # the forward pass itself
            return run(x, *args)
        live = tracker.get_states()
        tracker.set_states(start)
        try:
            return run(x, *args)
        finally:
            tracker.set_states(live)

    return deepspeed.checkpointing.checkpoint(replay, hidden, *(inputs[i] for i in given))
