"""Strata's checkpoint format (full tensors under canonical names, any layout to any layout)."""

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
