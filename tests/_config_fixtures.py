"""Helpers for the config and launcher tests: tiny datasets and config files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "configs"

# The MMIDIDX index layout used by GPT-NeoX's .idx files.
_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int32: 4, np.int64: 5, np.uint16: 8}


def write_dataset(prefix: Path, documents: list[list[int]], dtype: type = np.uint16) -> str:
    """Write `{prefix}.bin` / `{prefix}.idx` holding one sequence per document."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    arrays = [np.asarray(doc, dtype=dtype) for doc in documents]
    with open(f"{prefix}.bin", "wb") as handle:
        for array in arrays:
            handle.write(array.tobytes(order="C"))
    sizes = np.array([len(a) for a in arrays], dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(arrays), dtype=np.int64)
    if len(arrays) > 1:
        pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64) * itemsize)
    doc_idx = np.arange(len(arrays) + 1, dtype=np.int64)
    with open(f"{prefix}.idx", "wb") as handle:
        handle.write(_MAGIC)
        handle.write(struct.pack("<Q", 1))
        handle.write(struct.pack("<B", _DTYPE_CODES[dtype]))
        handle.write(struct.pack("<Q", len(sizes)))
        handle.write(struct.pack("<Q", len(doc_idx)))
        handle.write(sizes.tobytes(order="C"))
        handle.write(pointers.tobytes(order="C"))
        handle.write(doc_idx.tobytes(order="C"))
    return str(prefix)


def small_config(data_prefix: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid tiny model config (bytes tokenizer, one CPU process)."""
    config: dict[str, Any] = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "seq_length": 32,
        "max_position_embeddings": 32,
        "pos_emb": "rotary",
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3, "betas": [0.9, 0.95]}},
        "min_lr": 1.0e-4,
        "train_micro_batch_size_per_gpu": 4,
        "train_iters": 20,
        "tokenizer_type": "bytes",
        "num_gpus": 1,
    }
    if data_prefix is not None:
        config["data_path"] = data_prefix
    config.update(overrides)
    return config


def layout_config(
    tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, accumulation: int = 1
) -> dict[str, Any]:
    """Config keys of the (tp, pp, dp) layout with a ZeRO stage and gradient accumulation."""
    zero_optimization: dict[str, Any] = {"stage": zero}
    if zero == 3:
        # Partition every parameter (DeepSpeed keeps small ones whole on each rank).
        zero_optimization["stage3_param_persistence_threshold"] = 0
    return {
        "model_parallel_size": tp,
        "pipe_parallel_size": pp,
        "num_gpus": tp * pp * dp,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero_optimization,
    }


def write_config(path: Path, values: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)
