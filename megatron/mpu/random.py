"""Seeding and the RNG state that checkpoints save and restore."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def model_parallel_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states, as a picklable dict."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
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
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
