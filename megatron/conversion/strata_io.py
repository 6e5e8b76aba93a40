"""The Strata side of a conversion: the model a NeoX config describes and checkpoint reading."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from megatron.checkpoint import CheckpointError, resolve_checkpoint
from megatron.checkpoint.reader import read_model_tensors
from megatron.config import ConfigError, NeoXArgs
from megatron.conversion.hf_config import ConversionError
from megatron.conversion.layouts import Dims
from megatron.model import ModelConfig
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.groups_model import NeoXArgsModel
from megatron.neox_arguments.groups_other import NeoXArgsTokenizer
from megatron.neox_arguments.loading import load_files
from megatron.neox_arguments.model_keys import model_keys
from megatron.tokenizer import Tokenizer, build_tokenizer, pad_vocab_size

# Only the architecture and the tokenizer matter to a conversion; training settings (batch,
# data, precision, parallel layout) are left out so a model-only config is enough.
ARCHITECTURE_KEYS = frozenset(
    f.name for group in (NeoXArgsModel, NeoXArgsTokenizer) for f in dataclasses.fields(group)
) - {"precision"}
CONVERSION_SETTINGS = {"train_micro_batch_size_per_gpu": 1, "num_gpus": 1}


class NeoXModel(NamedTuple):
    """A model config file read for conversion."""

    config: ModelConfig
    keys: SimpleNamespace  # its NeoX keys (the tokenizer's among them), defaults filled in
    tokenizer: Tokenizer


def _architecture_values(config_files: list[str | os.PathLike[str]]) -> dict[str, Any]:
    problems = Problems()
    raw = load_files(list(config_files), problems)
    if problems.messages:
        names = ", ".join(map(str, config_files))
        raise ConversionError(f"config {names}:\n  " + "\n  ".join(problems.messages))
    return {k: v for k, v in raw.values.items() if k in ARCHITECTURE_KEYS}


def architecture_values(config_files: list[str | os.PathLike[str]]) -> dict[str, Any]:
    """The model and tokenizer keys the config files set (merged as NeoX merges them)."""
    return _architecture_values(config_files)


def configured_iteration(config_files: list[str | os.PathLike[str]]) -> int | None:
    """The `iteration` key of the config files (NeoX: the checkpoint step to load), if set."""
    problems = Problems()
    value = load_files(list(config_files), problems).values.get("iteration")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        names = ", ".join(map(str, config_files))
        raise ConversionError(f"config {names}: iteration: expected a step number, got {value!r}")
    return value


def model_config(values: dict[str, Any], padded_vocab_size: int, source: str) -> ModelConfig:
    """`ModelConfig.from_neox_keys`, its errors as ConversionError naming `source`."""
    try:
        return ModelConfig.from_neox_keys(values, padded_vocab_size, source)
    except ValueError as err:  # ConfigError, NotRegistered
        raise ConversionError(f"config {source}: {err}") from None


def read_model(config_files: list[str | os.PathLike[str]]) -> NeoXModel:
    """The model the config files describe (merged as NeoX merges them), from their model and
    tokenizer keys alone: no training config is built. The vocabulary is padded as a
    one-process run pads it."""
    names = ", ".join(map(str, config_files))
    values = _architecture_values(config_files)
    try:
        keys = model_keys(values, names)
        tokenizer = build_tokenizer(keys.tokenizer_type, keys.vocab_file, keys.merge_file)
    except (OSError, ValueError) as err:  # ConfigError, NotRegistered, tokenizer files
        raise ConversionError(f"config {names}: {err}") from None
    padded = pad_vocab_size(tokenizer.vocab_size, keys.make_vocab_size_divisible_by, 1)
    return NeoXModel(model_config(values, padded, names), keys, tokenizer)


def model_args(config_files: list[str | os.PathLike[str]], load: str | None = None) -> NeoXArgs:
    """A NeoXArgs of the model the config files describe, for loading the checkpoint `load`
    with `load_checkpoint` (which reads a run's config): one process, batch 1."""
    names = ", ".join(map(str, config_files))
    values = _architecture_values(config_files)
    try:
        return NeoXArgs.from_dict({**values, **CONVERSION_SETTINGS, "load": load})
    except ConfigError as err:
        raise ConversionError(f"config {names}: {err}") from None


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Canonical parameter names and shapes of GPTModel(config), built without allocating."""
    from megatron.model import GPTModel

    try:
        with torch.device("meta"):
            model = GPTModel(config)
    except ValueError as err:
        raise ConversionError(f"cannot build the configured model: {err}") from None
    return {name: p.shape for name, p in model.named_parameters()}


def dims_for(config: ModelConfig, hf_vocab: int) -> Dims:
    heads = config.num_attention_heads
    return Dims(
        heads=heads,
        kv_heads=config.num_kv_heads or heads,
        head_dim=config.hidden_size // heads,
        hf_vocab=hf_vocab,
        padded_vocab=config.padded_vocab_size,
    )


def read_checkpoint(
    load_dir: str | os.PathLike[str], iteration: int | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """The model tensors of the checkpoint `{load_dir}/latest` names (or of
    `global_step{iteration}`), and its folder."""
    try:
        folder = resolve_checkpoint(os.fspath(load_dir), iteration)
        return read_model_tensors(folder), folder
    except CheckpointError as err:
        raise ConversionError(str(err).removeprefix("load: ")) from None
