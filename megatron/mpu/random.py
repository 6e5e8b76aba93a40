"""Seeding, the model-parallel RNG tracker and the RNG state that checkpoints save and restore.

Two random streams serve dropout under tensor parallelism (as in Megatron-LM): the default
generator, seeded alike on every rank, for activations every tensor-parallel rank holds in full
(hidden dropout), so the ranks stay identical; and the tracker's model-parallel stream, seeded
per tensor-parallel rank, for activations split across ranks (attention probabilities of this
rank's heads), so each shard draws its own mask. Data-parallel replicas share both streams, as
in Megatron-LM.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from megatron.mpu.initialize import get_tensor_model_parallel_rank

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron-LM's offset between the shared seed and the tensor-parallel streams' seeds.
_MODEL_PARALLEL_SEED_OFFSET = 2718


GeneratorStates = dict[str, torch.Tensor]


def _generator_states() -> GeneratorStates:
    """The generators dropout may draw from: the CPU's and the current CUDA device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_generator_states(states: GeneratorStates) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _model_parallel_seed(seed: int) -> int:
    return seed + _MODEL_PARALLEL_SEED_OFFSET + get_tensor_model_parallel_rank()


class RNGStatesTracker:
    """Named generator states; ``fork(name)`` runs a block on one and keeps its advance."""

    def __init__(self) -> None:
        self.states: dict[str, GeneratorStates] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists")
        outer = _generator_states()
        torch.manual_seed(seed)
        self.states[name] = _generator_states()
        _set_generator_states(outer)

    def get_states(self) -> dict[str, GeneratorStates]:
        return {name: dict(states) for name, states in self.states.items()}

    def set_states(self, states: dict[str, GeneratorStates]) -> None:
        self.states = {name: dict(generators) for name, generators in states.items()}

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            if name != MODEL_PARALLEL_RNG:
                raise KeyError(f"RNG stream {name!r} is not set up")
            # A model used without model_parallel_seed (a plain Python session): derive the
            # stream from torch's seed, as model_parallel_seed would.
            self.add(name, _model_parallel_seed(torch.initial_seed()))
        outer = _generator_states()
        _set_generator_states(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _generator_states()
            _set_generator_states(outer)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) alike on every rank, and the
    tracker's model-parallel stream per tensor-parallel rank (after the process groups exist)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, _model_parallel_seed(seed))


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU, (when present) CUDA and the tracker's generator states, as a
    dict of tensors, numbers and strings: `torch.load(..., weights_only=True)` reads it back."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "tracker": _TRACKER.get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    missing = {"python", "numpy", "torch"} - state.keys()
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; expected a get_rng_state() dict")
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):  # states saved before were NumPy's own tuple
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        _TRACKER.set_states(state["tracker"])


@contextmanager
def init_rng(seed: int, stream: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded from (seed, stream), then restore it.

    Each model layer initialises its weights inside its own stream, so a layer's weights do not
    depend on which other layers this process builds (pipeline stages build only some).
    """
    derived = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: fork_rng(devices=[]) would not restore CUDA ones.
        torch.default_generator.manual_seed(derived)
        yield
