"""Strata's checkpoint format: full tensors under canonical names, written in pieces by the
processes that hold them and read back at any layout.

    format.py           file names, metadata, `latest`, version
    boxes.py            where a process's piece of a parameter sits in the full tensor
    parameters.py       what this process holds of each parameter, and writes
    optimizer_state.py  master weights and optimizer states under any DeepSpeed wrapper
    reader.py           reading full tensors or boxes of them (tools: open_checkpoint)
    save.py             per-process parallel writes, asynchronous saves, publishing
    load.py             loading into any layout

This module exports the format's names only: the config reads them without importing torch.
"""

from megatron.checkpoint.format import (
    FORMAT_VERSION,
    METADATA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    padded_vocab_size,
    read_metadata,
    resolve_checkpoint,
    tag_for,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "CheckpointError",
    "padded_vocab_size",
    "read_metadata",
    "resolve_checkpoint",
    "tag_for",
]
