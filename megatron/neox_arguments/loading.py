"""Reading NeoX YAML files, merging several, and applying `key=value` overrides."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron.neox_arguments.errors import ConfigError, Problems
from megatron.neox_arguments.redact import redact_text
from megatron.neox_arguments.schema import canonical_key, suggest

COMMAND_LINE = "command line"


@dataclass
class RawConfig:
    """Merged, not yet validated values, keyed by schema key, with where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    config_files: dict[str, str] = field(default_factory=dict)


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses a key written twice in one mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(
                f"{node.start_mark.name}: key {key!r} appears twice (lines {seen[key]} and {line})"
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML (NeoX's JSON-like dialect included); syntax errors name `source`."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_files(paths: list[str | os.PathLike[str]], problems: Problems) -> RawConfig:
    """Merge config files; a key set in two files (after dash/alias normalisation) is an error.

    Problems are added to `problems` so that later stages can report theirs too.
    """
    raw = RawConfig()
    for path in paths:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            problems.add(f"cannot read config file {path}: {exc.strerror}")
            continue
        name = os.path.basename(path)
        if name in raw.config_files:
            problems.add(
                f"two config files are named {name!r}; checkpoints store config files by name, "
                "so give them distinct names"
            )
        # Stored in checkpoints and passed to every process: credentials never are.
        raw.config_files[name] = redact_text(text)
        try:
            data = parse_yaml(text, path)
        except ConfigError as exc:
            problems.messages.extend(exc.problems)
            continue
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.add(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
            continue
        for key, value in data.items():
            _add_key(raw, str(key), value, path, problems)
    return raw


def _add_key(raw: RawConfig, key: str, value: Any, source: str, problems: Problems) -> None:
    canonical = canonical_key(key)
    if canonical is None:
        problems.add(f"unknown key {key!r} in {source}{suggest(key)}")
        return
    if canonical in raw.sources:
        first = raw.sources[canonical]
        where = f"in both {first} and {source}" if first != source else f"twice in {source}"
        problems.add(f"key {canonical!r} is set {where}")
        return
    raw.values[canonical] = value
    raw.sources[canonical] = source


def load_dict(values: dict[str, Any], source: str = "dict") -> RawConfig:
    """A RawConfig from an in-memory mapping (same key rules as files)."""
    raw = RawConfig()
    problems = Problems()
    for key, value in values.items():
        _add_key(raw, str(key), value, source, problems)
    problems.raise_if_any()
    return raw


def apply_overrides(raw: RawConfig, overrides: list[str], problems: Problems) -> None:
    """Apply `key=value` (value parsed as YAML); `a.b.c=v` sets a nested dict entry."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.add(f"command line override {item!r} is not of the form key=value")
            continue
        try:
            value = parse_yaml(text, f"command line override {item!r}")
        except ConfigError as exc:
            problems.add(str(exc))
            continue
        top, *path = key.strip().split(".")
        canonical = canonical_key(top)
        if canonical is None:
            problems.add(f"unknown key {top!r} in command line override {item!r}{suggest(top)}")
            continue
        if path:
            try:
                value = _set_nested(
                    canonical, copy.deepcopy(raw.values.get(canonical)), path, value
                )
            except _NotADict as exc:
                problems.add(f"command line override {item!r}: {exc}")
                continue
        raw.values[canonical] = value
        raw.sources[canonical] = COMMAND_LINE


class _NotADict(Exception):
    pass


def _set_nested(top: str, current: Any, path: list[str], value: Any) -> dict[str, Any]:
    """`current` (a dict, or None for a new one) with `value` stored under `path`."""
    root = {} if current is None else current
    if not isinstance(root, dict):
        raise _NotADict(f"{top!r} is a {type(root).__name__}, not a dict")
    node = root
    for depth, part in enumerate(path[:-1], start=1):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join([top, *path[:depth]])
            raise _NotADict(f"{dotted!r} is a {type(child).__name__}, not a dict")
        node = child
    node[path[-1]] = value
    return root
