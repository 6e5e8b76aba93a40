"""The whole schema: every argument group, key spelling rules and look-ups."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import Field
from typing import Any

from megatron.neox_arguments.fields import Support, field_support
from megatron.neox_arguments.groups_deepspeed import (
    NeoXArgsDeepspeedConfig,
    NeoXArgsDeepspeedRunner,
)
from megatron.neox_arguments.groups_model import NeoXArgsModel
from megatron.neox_arguments.groups_other import (
    NeoXArgsDerived,
    NeoXArgsLogging,
    NeoXArgsLRScheduler,
    NeoXArgsOptimizer,
    NeoXArgsOther,
    NeoXArgsParallelism,
    NeoXArgsTextgen,
    NeoXArgsTokenizer,
)
from megatron.neox_arguments.groups_training import NeoXArgsTraining

GROUPS: tuple[type, ...] = (
    NeoXArgsDeepspeedRunner,
    NeoXArgsDeepspeedConfig,
    NeoXArgsModel,
    NeoXArgsLRScheduler,
    NeoXArgsOptimizer,
    NeoXArgsTokenizer,
    NeoXArgsTraining,
    NeoXArgsParallelism,
    NeoXArgsLogging,
    NeoXArgsTextgen,
    NeoXArgsOther,
    NeoXArgsDerived,
)

# Old or duplicate NeoX names that mean the same as a schema key. NeoX itself overwrites `gas`,
# `batch_size` and `clip_grad` with the DeepSpeed keys; `save_interval` is checkpoint_factor's
# name before NeoX renamed it, and still appears in its older configs.
ALIASES: dict[str, str] = {
    "gas": "gradient_accumulation_steps",
    "batch_size": "train_micro_batch_size_per_gpu",
    "clip_grad": "gradient_clipping",
    "save_interval": "checkpoint_factor",
}


def _collect_fields() -> dict[str, Field[Any]]:
    fields: dict[str, Field[Any]] = {}
    for group in GROUPS:
        for f in dataclasses.fields(group):
            if f.name in fields:
                raise TypeError(f"schema key {f.name!r} is declared in two argument groups")
            fields[f.name] = f
    return fields


FIELDS: dict[str, Field[Any]] = _collect_fields()


def _collect_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for group in GROUPS:
        hints.update(typing.get_type_hints(group, include_extras=True))
    return hints


TYPES: dict[str, Any] = _collect_types()


def normalize_key(key: str) -> str:
    """NeoX treats dashes in top-level keys as underscores."""
    return key.strip().replace("-", "_")


def canonical_key(key: str) -> str | None:
    """The schema key a config key names (dashes and aliases resolved), or None if unknown."""
    key = normalize_key(key)
    key = ALIASES.get(key, key)
    return key if key in FIELDS else None


def suggest(key: str) -> str:
    """' (did you mean 'x'?)' for the closest known key, or ''."""
    candidates = list(FIELDS) + list(ALIASES)
    match = difflib.get_close_matches(normalize_key(key), candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def support_of(key: str) -> Support:
    return field_support(FIELDS[key])


def default_of(key: str) -> Any:
    return FIELDS[key].default
