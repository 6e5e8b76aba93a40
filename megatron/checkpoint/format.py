"""The checkpoint format's names and metadata, readable without torch (the config reads them).

{save}/global_step{N}/
    model.safetensors      model weights in the parameters' dtype, canonical names; with more
                           than one process, model-{r}-of-{W}.safetensors: process r-1's pieces
    optimizer.safetensors  per parameter: "{name}.master" (fp32 master, when the model is not
                           fp32) and "{name}.{key}" for each optimizer state (exp_avg, ...);
                           sharded like the model
    rng/rank{R}.pt         each rank's Python / NumPy / torch RNG states
    metadata.json          iteration, data position, optimizer step, scheduler, shapes,
                           padded_vocab_size, the tensor files
    configs/               the config files the run started from
{save}/latest              "global_step{N}": written last and atomically

Each process writes the pieces of the full tensors it holds (megatron/checkpoint/boxes.py): a
piece is stored under the tensor's name when it is the whole tensor, else under
"{name}[start:end,...]" (its box in the full tensor), and every value is written once.
Version 1 (one process wrote everything, always whole tensors) reads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METADATA_FILE = "metadata.json"
EMBEDDING = "embedding.word_embeddings.weight"
TENSOR_KINDS = ("model", "optimizer")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the configured model."""


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def shard_files(kind: str, world_size: int) -> list[str]:
    """The files holding the `kind` ("model" or "optimizer") tensors of `world_size` writers,
    named as Hugging Face names sharded safetensors."""
    if world_size == 1:
        return [f"{kind}.safetensors"]
    return [f"{kind}-{r:05d}-of-{world_size:05d}.safetensors" for r in range(1, world_size + 1)]


def tensor_files(metadata: dict, kind: str) -> list[str]:
    """The files of `kind` a checkpoint's metadata lists (none for an optimizer not saved;
    version 1: one file)."""
    if "files" in metadata:
        return metadata["files"].get(kind, [])
    return shard_files(kind, 1)


def resolve_checkpoint(load: str, iteration: int | None = None) -> Path:
    """The folder `{load}/latest` names (or `global_step{iteration}`, NeoX's `iteration`
    key), checked to be complete; a clear error otherwise."""
    load_dir = Path(load)
    if not load_dir.is_dir():
        raise CheckpointError(f"load: checkpoint directory {load_dir} does not exist")
    if iteration is not None:
        folder, named_by = load_dir / tag_for(iteration), f"iteration {iteration}"
        if not folder.is_dir():
            saved = sorted(
                int(path.name.removeprefix("global_step"))
                for path in load_dir.glob("global_step*")
                if path.name.removeprefix("global_step").isdigit()
                and (path / METADATA_FILE).is_file()
            )
            raise CheckpointError(
                f"load: {load_dir} has no checkpoint of iteration {iteration} (complete ones: "
                f"{', '.join(map(tag_for, saved)) or 'none'})"
            )
    else:
        latest = load_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(
                f"load: {load_dir} has no 'latest' file naming a checkpoint "
                "(expected {load}/latest holding a tag such as global_step1000)"
            )
        folder, named_by = load_dir / latest.read_text().strip(), str(latest)
    if not (folder / METADATA_FILE).is_file():
        raise CheckpointError(
            f"load: checkpoint {folder} (named by {named_by}) is incomplete: {METADATA_FILE} is "
            "missing"
        )
    for required in tensor_files(read_metadata(folder), "model"):
        if not (folder / required).is_file():
            raise CheckpointError(
                f"load: checkpoint {folder} (named by {named_by}) is incomplete: {required} is "
                "missing"
            )
    return folder


def read_metadata(folder: Path) -> dict:
    """metadata.json of a checkpoint folder, checked to be of a version this Strata reads."""
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"load: cannot read {folder / METADATA_FILE}: {err}") from err
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"load: {folder / METADATA_FILE} has format_version {metadata.get('format_version')}, "
            f"this Strata reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return metadata


def padded_vocab_size(metadata: dict) -> int | None:
    """The vocabulary rows the checkpoint's model has (checkpoints written before the key was
    recorded: its embedding's shape)."""
    if metadata.get("padded_vocab_size"):
        return int(metadata["padded_vocab_size"])
    shape = (metadata.get("shapes") or {}).get(EMBEDDING)
    return int(shape[0]) if shape else None
