"""`NeoXArgs`: the validated configuration object passed through the whole program."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from megatron.neox_arguments import derive, rules, validation
from megatron.neox_arguments.deepspeed_config import build_deepspeed_config
from megatron.neox_arguments.errors import ConfigError, Problems
from megatron.neox_arguments.loading import (
    RawConfig,
    apply_overrides,
    load_dict,
    load_files,
)
from megatron.neox_arguments.micro_batch import size_by_estimate
from megatron.neox_arguments.redact import redact_values
from megatron.neox_arguments.report import derived_table
from megatron.neox_arguments.schema import GROUPS, TYPES
from megatron.neox_arguments.typecheck import TypeMismatch, coerce

JSON_SOURCE = "--megatron_config"


@dataclass
class NeoXArgs(*GROUPS):  # type: ignore[misc]
    """Every NeoX key as an attribute (dashes become underscores), plus derived values.

    Build with `from_ymls`, `from_dict`, `from_json` or `consume_neox_args`; each validates and
    derives. Extra attributes: `hosts` (slots per host, None for local runs), `warnings` and
    `notes` (how values were derived from files, printed with the derived table). Nothing
    changes a built config: values that depend on the data (train_iters from train_epochs) are
    derived here, from the dataset's index.
    """

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_ymls(
        cls,
        paths: list[str | os.PathLike[str]],
        overrides: list[str] | None = None,
        *,
        check_files: bool = True,
        user_script: str | None = None,
    ) -> NeoXArgs:
        """Merge YAML files, apply `key=value` overrides (they win), validate and derive.

        `check_files=False` skips the file system (dataset and tokenizer files); the padded
        vocabulary and parameter count are then left unset. `user_script`: the script a
        launcher will run with this config (deepy.py's first argument).
        """
        problems = Problems()
        raw = load_files(list(paths), problems)
        apply_overrides(raw, list(overrides or []), problems)
        problems.raise_if_any()
        return cls._build(
            raw, from_launcher=False, check_files=check_files, user_script=user_script
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, check_files: bool = True) -> NeoXArgs:
        """Same rules as from_ymls, for an in-memory mapping."""
        return cls._build(load_dict(values), from_launcher=False, check_files=check_files)

    @classmethod
    def from_json(cls, text: str) -> NeoXArgs:
        """Inverse of to_json: the resolved config a launcher passed to each process."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{JSON_SOURCE}: not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{JSON_SOURCE}: expected a JSON object")
        raw = load_dict(values, source=JSON_SOURCE)
        raw.config_files = raw.values.pop("config_files", None) or {}
        return cls._build(raw, from_launcher=True, check_files=True)

    @classmethod
    def consume_neox_args(cls, argv: list[str] | None = None) -> NeoXArgs:
        """The config inside a training script.

        Reads `--megatron_config <base64 of to_json()>` (or a path to that JSON) as passed by
        deepy.py, or, for a direct single-process run, config paths plus `key=value`
        overrides. `--local_rank`/`--local-rank` (added by launchers) and `--deepspeed_config`
        are ignored.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        encoded, positional = _split_argv(argv)
        if encoded is not None:
            if positional:
                raise ConfigError(
                    f"--megatron_config cannot be combined with config files or overrides: "
                    f"{positional}"
                )
            args = cls.from_json(_decode_megatron_config(encoded))
            _read_ranks(args)
            return args
        files = [a for a in positional if "=" not in a]
        overrides = [a for a in positional if "=" in a]
        if not files:
            raise ConfigError(
                "no configuration: pass --megatron_config (deepy.py does) or config files"
            )
        return cls.from_ymls(files, overrides, user_script=sys.argv[0])

    @classmethod
    def _build(
        cls,
        raw: RawConfig,
        from_launcher: bool,
        check_files: bool,
        user_script: str | None = None,
    ) -> NeoXArgs:
        problems = Problems()
        if not from_launcher:
            rules.require_all()
            validation.check_derived_keys(raw.sources, problems)
        values: dict[str, Any] = {}
        for key, value in raw.values.items():
            try:
                values[key] = coerce(value, TYPES[key])
            except TypeMismatch as expected:
                problems.add(
                    f"key {key!r} (from {raw.sources[key]}): expected {expected}, got "
                    f"{type(value).__name__} {value!r}{expected.hint}"
                )
        if not from_launcher:
            validation.check_run_length(values, problems)
        if user_script is not None:
            values["user_script"] = user_script  # derived: not a key the files may set
        problems.raise_if_any()
        args = cls(**values)
        args.config_files = dict(raw.config_files)
        object.__setattr__(args, "_sources", dict(raw.sources))
        args.warnings, args.notes = [], []
        validation.check_support(args, problems)
        problems.raise_if_any()
        derive.derive_all(args, problems, resolve_resources=not from_launcher)
        validation.check_values(args, problems)
        rules.check_rules(args, problems)
        if not problems.messages:
            try:
                build_deepspeed_config(args)
            except ConfigError as exc:
                problems.messages.extend(exc.problems)
        problems.raise_if_any()
        if check_files:
            validation.check_files(args, problems)
            problems.raise_if_any()
            if args.padded_vocab_size is None:
                derive.derive_vocab(args)
            if args.train_iters is None and args.train_epochs is not None:
                derive.derive_train_iters(args)
            if args.auto_micro_batch and not from_launcher:
                size_by_estimate(args)
        derive.derive_sizes(args)
        return args

    # ------------------------------------------------------------------ views
    def where(self, key: str) -> str:
        """' (from <file or command line>)' for a key that was set, '' for a default."""
        source = getattr(self, "_sources", {}).get(key)
        return f" (from {source})" if source else ""

    @property
    def deepspeed_config(self) -> dict[str, Any]:
        return build_deepspeed_config(self)

    @property
    def params_dtype(self) -> Any:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)

    def values(self) -> dict[str, Any]:
        """Every schema key and its value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Keys whose value differs from the schema default (from_json restores the rest).

        Credential-looking values are redacted (no schema key needs one: W&B and the Hub read
        theirs from the environment), so the launch command never carries a secret."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = {
            key: value
            for key, value in self.values().items()
            if not (type(value) is type(defaults[key]) and value == defaults[key])
        }
        return json.dumps(redact_values(changed), sort_keys=True, separators=(",", ":"))

    def encoded(self) -> str:
        """to_json() in URL-safe base64, as passed to `--megatron_config`."""
        return base64.urlsafe_b64encode(self.to_json().encode("utf-8")).decode("ascii")

    def derived_table(self) -> str:
        return derived_table(self)


def _read_ranks(args: NeoXArgs) -> None:
    """rank, local_rank and world_size from the launcher's environment (Slurm's with
    deepspeed_slurm), for information: the config's world size stays the resolved one."""
    names = (
        ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
        if args.deepspeed_slurm
        else ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    )
    for key, name in zip(("rank", "local_rank", "world_size"), names):
        if os.environ.get(name, "").isdigit():
            setattr(args, key, int(os.environ[name]))


def _split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--megatron_config value or None, positional arguments); launcher flags dropped."""
    encoded: str | None = None
    positional: list[str] = []
    items = iter(argv)
    for item in items:
        name, eq, value = item.partition("=")
        if name in ("--local_rank", "--local-rank", "--deepspeed_config", "--megatron_config"):
            if not eq:
                value = next(items, "")
            if name == "--megatron_config":
                encoded = value
        elif item.startswith("--"):
            raise ConfigError(f"unknown command-line option {item!r}")
        else:
            positional.append(item)
    return encoded, positional


def _decode_megatron_config(value: str) -> str:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            return handle.read()
    try:
        return base64.b64decode(value.encode("ascii"), altchars=b"-_", validate=True).decode(
            "utf-8"
        )
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        raise ConfigError("--megatron_config is neither a file nor base64-encoded JSON") from None
