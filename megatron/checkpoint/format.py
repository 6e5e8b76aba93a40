"""The checkpoint format's names and metadata, readable without torch (the config reads them).

{save}/global_step{N}/
    model.safetensors      model weights in the parameters' dtype, canonical names
    optimizer.safetensors  per parameter: "{name}.master" (fp32 master, when the model is not
                           fp32) and "{name}.{key}" for each optimizer state (exp_avg, ...)
    rng/rank{R}.pt         each rank's Python / NumPy / torch RNG states
    metadata.json          iteration, data position, optimizer step, scheduler, shapes,
                           padded_vocab_size
    configs/               the config files the run started from
{save}/latest              "global_step{N}": written last and atomically
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METADATA_FILE = "metadata.json"
EMBEDDING = "embedding.word_embeddings.weight"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the configured model."""


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def resolve_checkpoint(load: str) -> Path:
    """The folder `{load}/latest` names, checked to be complete; a clear error otherwise."""
    load_dir = Path(load)
    if not load_dir.is_dir():
        raise CheckpointError(f"load: checkpoint directory {load_dir} does not exist")
    latest = load_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(
            f"load: {load_dir} has no 'latest' file naming a checkpoint "
            "(expected {load}/latest holding a tag such as global_step1000)"
        )
    tag = latest.read_text().strip()
    folder = load_dir / tag
    for required in (MODEL_FILE, METADATA_FILE):
        if not (folder / required).is_file():
            raise CheckpointError(
                f"load: checkpoint {folder} (named by {latest}) is incomplete: {required} is missing"
            )
    return folder


def read_metadata(folder: Path) -> dict:
    """metadata.json of a checkpoint folder, checked to be of this format version."""
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"load: cannot read {folder / METADATA_FILE}: {err}") from err
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"load: {folder / METADATA_FILE} has format_version {metadata.get('format_version')}, "
            f"this Strata reads version {FORMAT_VERSION}"
        )
    return metadata


def padded_vocab_size(metadata: dict) -> int | None:
    """The vocabulary rows the checkpoint's model has (checkpoints written before the key was
    recorded: its embedding's shape)."""
    if metadata.get("padded_vocab_size"):
        return int(metadata["padded_vocab_size"])
    shape = (metadata.get("shapes") or {}).get(EMBEDDING)
    return int(shape[0]) if shape else None
