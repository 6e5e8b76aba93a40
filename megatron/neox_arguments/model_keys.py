"""The keys of a model on their own, for tools that build a model but do not train it.

Conversion reads a model config (a converted Hugging Face config, or the model and tokenizer
files of a training config): batch, data, optimizer and parallel settings are neither read nor
required, so no training config has to be made up around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from megatron.neox_arguments import derive
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.loading import load_dict
from megatron.neox_arguments.schema import FIELDS, TYPES
from megatron.neox_arguments.sizes import ffn_sizes
from megatron.neox_arguments.typecheck import TypeMismatch, coerce


def model_keys(values: Mapping[str, Any], source: str) -> SimpleNamespace:
    """Every schema key at NeoX's default, overlaid with `values` checked as a config's keys
    are (ConfigError naming the key and `source`), plus the model's derived keys: one attention
    type per layer and the MLP width (`ffn_hidden_size`)."""
    problems = Problems()
    keys = {name: f.default for name, f in FIELDS.items()}
    for key, value in load_dict(dict(values), source).values.items():
        try:
            keys[key] = coerce(value, TYPES[key])
        except TypeMismatch as expected:
            problems.add(
                f"key {key!r} (from {source}): expected {expected}, got "
                f"{type(value).__name__} {value!r}{expected.hint}"
            )
    problems.raise_if_any()
    model = SimpleNamespace(**keys)
    derive.attention_types(model)
    model.ffn_hidden_size = ffn_sizes(model)[1]
    return model
