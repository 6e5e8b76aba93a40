"""Rules a typed config must satisfy: support levels, consistency and existing files."""

from __future__ import annotations

import os
from typing import Any

from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.fields import Support, field_doc
from megatron.neox_arguments.schema import FIELDS

# Where each derived key comes from, for the error when a config sets it.
DERIVED_FROM = {
    "lr": "optimizer.params.lr",
    "optimizer_type": "optimizer.type",
    "padded_vocab_size": "the tokenizer and make_vocab_size_divisible_by",
    "is_pipe_parallel": "pipe_parallel_size",
    "dynamic_loss_scale": "fp16.loss_scale",
    "user_script": "deepy.py's first argument",
    "config_files": "the config files themselves",
}


def _off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def is_default(value: Any, default: Any) -> bool:
    """Equal to NeoX's default, counting None / False / empty as the same 'off'."""
    if _off(value) and _off(default):
        return True
    return type(value) is type(default) and value == default


def check_derived_keys(keys: dict[str, str], problems: Problems) -> None:
    """Config files may not set derived keys ({key: source})."""
    for key, source in keys.items():
        if FIELDS[key].metadata.get("support") is not Support.DERIVED:
            continue
        origin = DERIVED_FROM.get(key)
        if key.startswith("zero_"):
            origin = "zero_optimization"
        detail = f"it is derived from {origin}" if origin else "Strata computes it"
        problems.add(f"key {key!r} (from {source}) cannot be set: {detail}")


def check_support(args: Any, problems: Problems) -> None:
    """Features Strata does not implement yet are errors, never silently ignored."""
    for key, f in FIELDS.items():
        if f.metadata.get("support") is not Support.DEFAULT_ONLY:
            continue
        value = getattr(args, key)
        if not is_default(value, f.default):
            doc = field_doc(f).rstrip(".")
            problems.add(
                f"{key}={value!r}{args.where(key)} is not supported yet "
                f"({doc}); only NeoX's default {f.default!r} is accepted"
            )
    for key, feature in (
        ("model_parallel_size", "tensor parallelism"),
        ("pipe_parallel_size", "pipeline parallelism"),
    ):
        value = getattr(args, key)
        if value < 0:
            problems.add(f"{key} must be >= 0, got {value}")
        elif value > 1:
            problems.add(
                f"{key}={value}{args.where(key)}: {feature} is not supported "
                "yet; use 1 (0 and 1 both mean none)"
            )
    if not args.deepspeed:
        problems.add("deepspeed=False: Strata always trains through DeepSpeed")
    if args.data_impl == "cached":
        problems.add(
            "data_impl='cached' is not supported yet; Strata reads mmap (MMIDIDX) datasets"
        )


def _positive(args: Any, problems: Problems, keys: tuple[str, ...], minimum: int = 1) -> None:
    for key in keys:
        value = getattr(args, key)
        if value is not None and value < minimum:
            problems.add(f"{key} must be >= {minimum}, got {value}{args.where(key)}")


def _in_range(
    args: Any, problems: Problems, key: str, low: float, high: float, closed: bool
) -> None:
    value = getattr(args, key)
    if value is None:
        return
    ok = low <= value <= high if closed else low <= value < high
    if not ok:
        bracket = "]" if closed else ")"
        problems.add(f"{key} must be in [{low}, {high}{bracket}, got {value}{args.where(key)}")


def check_values(args: Any, problems: Problems) -> None:
    """Consistency between keys; each message shows the arithmetic."""
    for key in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "max_position_embeddings",
    ):
        if getattr(args, key) is None:
            problems.add(f"{key} is required")
    _positive(
        args,
        problems,
        (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "seq_length",
            "max_position_embeddings",
            "intermediate_size",
            "mlp_multiple_of",
            "make_vocab_size_divisible_by",
            "train_iters",
            "train_epochs",
            "eval_interval",
            "log_interval",
            "keep_last_n_checkpoints",
            "checkpoint_num_layers",
            "steps_per_print",
            "lr_decay_iters",
            "maximum_tokens",
            "num_samples",
            "rotary_emb_base",
        ),
    )
    _positive(args, problems, ("eval_iters", "num_workers", "top_k"), minimum=0)
    h, heads, kv = args.hidden_size, args.num_attention_heads, args.num_kv_heads
    if h and heads and h > 0 and heads > 0 and h % heads:
        problems.add(
            f"hidden_size ({h}) must be divisible by num_attention_heads ({heads}): "
            f"{h} / {heads} = {h / heads:g}"
        )
    if heads and kv and heads > 0 and kv > 0:
        if kv > heads or heads % kv:
            problems.add(
                f"num_attention_heads ({heads}) must be a multiple of num_kv_heads ({kv}): "
                f"{heads} / {kv} = {heads / kv:g}"
            )
    seq, max_pos = args.seq_length, args.max_position_embeddings
    if seq and max_pos and seq > max_pos:
        problems.add(
            f"seq_length ({seq}) must be <= max_position_embeddings ({max_pos}): {seq} > {max_pos}"
        )
    _in_range(args, problems, "warmup", 0.0, 1.0, closed=True)
    _in_range(args, problems, "rotary_pct", 0.0, 1.0, closed=True)
    _in_range(args, problems, "hidden_dropout", 0.0, 1.0, closed=False)
    _in_range(args, problems, "attention_dropout", 0.0, 1.0, closed=False)
    _in_range(args, problems, "top_p", 0.0, 1.0, closed=True)
    for key in ("weight_decay", "gradient_clipping", "min_lr", "temperature"):
        if getattr(args, key) < 0:
            problems.add(f"{key} must be >= 0, got {getattr(args, key)}")
    if args.init_method_std <= 0:
        problems.add(f"init_method_std must be > 0, got {args.init_method_std}")
    if args.lr is not None and args.min_lr > args.lr:
        problems.add(f"min_lr ({args.min_lr}) must be <= the learning rate ({args.lr})")
    if args.text_gen_type not in ("unconditional", "input-file", "interactive", "precompute"):
        problems.add(
            f"text_gen_type must be unconditional, input-file, interactive or precompute, "
            f"got {args.text_gen_type!r}"
        )
    _check_split(args, problems)
    _check_data_keys(args, problems)


def _check_split(args: Any, problems: Problems) -> None:
    try:
        parts = [float(p) for p in args.split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        problems.add(
            f"split must be up to three comma-separated non-negative proportions like "
            f"'949,50,1', got {args.split!r}"
        )


def _check_data_keys(args: Any, problems: Problems) -> None:
    separate = [getattr(args, f"{s}_data_paths") for s in ("train", "valid", "test")]
    if any(p is not None for p in separate):
        if args.data_path is not None:
            problems.add("set either data_path or train/valid/test_data_paths, not both")
        missing = [s for s, p in zip(("train", "valid", "test"), separate) if p is None]
        if missing:
            problems.add(
                "train_data_paths, valid_data_paths and test_data_paths go together; missing: "
                + ", ".join(f"{s}_data_paths" for s in missing)
            )


DATA_PATH_KEYS = tuple(key for key in FIELDS if key.endswith("_data_paths"))


def check_files(args: Any, problems: Problems) -> None:
    """Data prefixes need {prefix}.bin and {prefix}.idx; tokenizer files must exist."""
    prefixes: list[tuple[str, str]] = []
    if args.data_path is not None:
        prefixes.append(("data_path", args.data_path))
    for key in DATA_PATH_KEYS:
        prefixes.extend((key, p) for p in getattr(args, key) or [])
    for key, prefix in prefixes:
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            problems.add(
                f"{key}{args.where(key)}: dataset {prefix!r} not found "
                f"(missing {', '.join(missing)})"
            )
    for key in ("vocab_file", "merge_file"):
        path = getattr(args, key)
        if path is not None and not os.path.isfile(path):
            problems.add(f"{key}{args.where(key)}: file not found: {path}")
