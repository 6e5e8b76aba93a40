"""The Strata side of a conversion: the model a NeoX config describes and checkpoint reading."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint import MODEL_FILE, CheckpointError, read_metadata, resolve_checkpoint
from megatron.checkpointing import _read_tensors
from megatron.config import ConfigError, NeoXArgs
from megatron.conversion.hf_config import ConversionError
from megatron.conversion.layouts import Dims
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.groups_model import NeoXArgsModel
from megatron.neox_arguments.groups_other import NeoXArgsTokenizer
from megatron.neox_arguments.loading import load_files

# Only the architecture and the tokenizer matter to a conversion; training settings (batch,
# data, precision, parallel layout) are left out so a model-only config is enough.
ARCHITECTURE_KEYS = frozenset(
    f.name for group in (NeoXArgsModel, NeoXArgsTokenizer) for f in dataclasses.fields(group)
) - {"precision"}
CONVERSION_SETTINGS = {"train_micro_batch_size_per_gpu": 1, "num_gpus": 1}


def model_args(config_files: list[str | os.PathLike[str]]) -> NeoXArgs:
    """NeoX arguments of the model the config files describe (merged as NeoX merges them)."""
    problems = Problems()
    raw = load_files(list(config_files), problems)
    names = ", ".join(map(str, config_files))
    if problems.messages:
        raise ConversionError(f"config {names}:\n  " + "\n  ".join(problems.messages))
    values = {k: v for k, v in raw.values.items() if k in ARCHITECTURE_KEYS}
    try:
        return NeoXArgs.from_dict({**values, **CONVERSION_SETTINGS})
    except ConfigError as err:
        raise ConversionError(f"config {names}: {err}") from None


def expected_shapes(args: Any) -> dict[str, torch.Size]:
    """Canonical parameter names and shapes of GPTModel(config), built without allocating."""
    from megatron.model import GPTModel, ModelConfig

    try:
        with torch.device("meta"):
            model = GPTModel(ModelConfig.from_neox(args))
    except ValueError as err:
        raise ConversionError(f"cannot build the configured model: {err}") from None
    return {name: p.shape for name, p in model.named_parameters()}


def dims_for(args: Any, hf_vocab: int) -> Dims:
    heads = args.num_attention_heads
    return Dims(
        heads=heads,
        kv_heads=args.num_kv_heads or heads,
        head_dim=args.hidden_size // heads,
        hf_vocab=hf_vocab,
        padded_vocab=args.padded_vocab_size,
    )


def read_checkpoint(load_dir: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """The model tensors of the checkpoint `{load_dir}/latest` names, and its folder."""
    try:
        folder = resolve_checkpoint(os.fspath(load_dir))
        read_metadata(folder)
        return _read_tensors(folder / MODEL_FILE), folder
    except CheckpointError as err:
        raise ConversionError(str(err).removeprefix("load: ")) from None
