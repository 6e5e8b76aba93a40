"""Rules a typed config must satisfy: support levels, consistency and existing files."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.fields import Support, field_doc
from megatron.neox_arguments.schema import FIELDS
from megatron.neox_arguments.sizes import ffn_sizes

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


def check_run_length(values: dict[str, Any], problems: Problems) -> None:
    """A config sets train_iters or train_epochs (the config a launcher passes on has both:
    train_iters is then the one derived from train_epochs)."""
    iters, epochs = values.get("train_iters"), values.get("train_epochs")
    if iters is not None and epochs is not None:
        problems.add(
            f"train_iters ({iters}) and train_epochs ({epochs}) are both set; set only one"
        )


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
    if args.model_parallel_size < 0:
        problems.add(f"model_parallel_size must be >= 0, got {args.model_parallel_size}")
    if args.pipe_parallel_size < 0:
        problems.add(f"pipe_parallel_size must be >= 0, got {args.pipe_parallel_size}")
    elif args.pipe_parallel_size > 1:
        _check_pipeline(args, problems)
    if not args.deepspeed:
        problems.add("deepspeed=False: Strata always trains through DeepSpeed")
    if args.data_impl == "cached":
        problems.add(
            "data_impl='cached' is not supported yet; Strata reads mmap (MMIDIDX) datasets"
        )


def _check_pipeline(args: Any, problems: Problems) -> None:
    """What DeepSpeed's pipeline engine runs today (pipe_parallel_size >= 2)."""
    pp, where = args.pipe_parallel_size, args.where("pipe_parallel_size")
    if args.num_layers and args.num_layers < pp:
        problems.add(
            f"num_layers ({args.num_layers}) must be >= pipe_parallel_size ({pp}){where}: "
            "every pipeline stage needs at least one transformer layer"
        )
    method = args.pipe_partition_method
    if method not in ("parameters", "uniform") and not method.startswith("type:"):
        problems.add(
            f"pipe_partition_method={method!r}{args.where('pipe_partition_method')}: expected "
            "'parameters', 'uniform' or 'type:<regex of layer class names>'"
        )
    unsupported = {
        "train_impl": args.train_impl != "normal",
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
    }
    for key, used in unsupported.items():
        if used:
            problems.add(
                f"{key}={getattr(args, key)!r}{args.where(key)} with pipe_parallel_size={pp}"
                f"{where} is not supported yet (pipelines train train_impl 'normal' on plain "
                "causal batches); set pipe_parallel_size to 1"
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


def _check_eval_iters(args: Any, problems: Problems) -> None:
    """Iterations per evaluation; -1 (the whole split) only where nothing trains."""
    value, where = args.eval_iters, args.where("eval_iters")
    if value is None or value >= 0:
        return
    if value != -1:
        problems.add(f"eval_iters must be >= 0, or -1 for the whole split, got {value}{where}")
    elif os.path.basename(args.user_script or "") != "eval.py":
        problems.add(
            f"eval_iters=-1{where} (the whole split) is for eval.py; training evaluates a "
            "fixed number of iterations (eval_iters >= 0)"
        )


def _check_eval_tasks_interval(args: Any, problems: Problems) -> None:
    """Evaluation during training runs the live model's forward outside the engine."""
    if not args.eval_tasks_interval:
        return
    where = args.where("eval_tasks_interval")
    if not args.eval_tasks:
        problems.add(f"eval_tasks_interval{where} needs eval_tasks (the harness tasks to run)")
    # ZeRO-3 gathers weights in collectives the data-parallel ranks, scoring different
    # documents, would not call together; sequence parallelism cuts requests of any length.
    if args.zero_stage == 3 or (args.sequence_parallel and args.model_parallel_size > 1):
        problems.add(
            f"eval_tasks_interval{where}: evaluation during training runs with tensor, "
            "pipeline and data parallelism and ZeRO stages 0-2, not ZeRO stage 3 or "
            "sequence_parallel; score the saved checkpoints with eval.py instead"
        )


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
            "sliding_window_width",
            "eval_limit",
            "eval_batch_size",
            "eval_tasks_interval",
        ),
    )
    _positive(args, problems, ("num_workers", "top_k", "eval_num_fewshot"), minimum=0)
    _check_eval_iters(args, problems)
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
            problems.add(f"{key} must be >= 0, got {getattr(args, key)}{args.where(key)}")
    if args.skip_nonfinite_steps < 0:
        problems.add(
            f"skip_nonfinite_steps must be >= 0, got {args.skip_nonfinite_steps}"
            f"{args.where('skip_nonfinite_steps')}"
        )
    if args.distributed_timeout_minutes <= 0:
        problems.add(
            f"distributed_timeout_minutes must be > 0, got {args.distributed_timeout_minutes}"
            f"{args.where('distributed_timeout_minutes')}"
        )
    if args.init_method_std <= 0:
        problems.add(f"init_method_std must be > 0, got {args.init_method_std}")
    if args.lr is not None and args.min_lr > args.lr:
        problems.add(f"min_lr ({args.min_lr}) must be <= the learning rate ({args.lr})")
    if args.text_gen_type not in ("unconditional", "input-file", "interactive", "precompute"):
        problems.add(
            f"text_gen_type must be unconditional, input-file, interactive or precompute, "
            f"got {args.text_gen_type!r}"
        )
    if not args.prompt_end:
        problems.add(f"prompt_end must be a non-empty separator{args.where('prompt_end')}")
    _check_eval_tasks_interval(args, problems)
    _check_split(args, problems)
    _check_data_keys(args, problems)
    _check_blending(args, problems)
    _check_train_impl(args, problems)
    _check_attention(args, problems)
    _check_tensor_parallel(args, problems)
    _check_mlp_norm_mup(args, problems)


def _check_mlp_norm_mup(args: Any, problems: Problems) -> None:
    """MLP width keys, Transformer Engine norms and muP's scales (the init methods and the
    optimizer it can use register their own rules)."""
    if args.intermediate_size and args.expansion_factor:
        problems.add(
            f"set intermediate_size ({args.intermediate_size}){args.where('intermediate_size')} "
            f"or expansion_factor ({args.expansion_factor}){args.where('expansion_factor')}, "
            "not both"
        )
    if args.expansion_factor is not None and args.expansion_factor <= 0:
        problems.add(f"expansion_factor must be > 0, got {args.expansion_factor}")
    for key in ("layernorm_epsilon", "rms_norm_epsilon", "scalenorm_epsilon"):
        if getattr(args, key) < 0:
            problems.add(f"{key} must be >= 0, got {getattr(args, key)}{args.where(key)}")
    if args.norm.startswith("te_") and importlib.util.find_spec("transformer_engine") is None:
        problems.add(
            f"norm={args.norm!r}{args.where('norm')} needs NVIDIA Transformer Engine, which is "
            f"not installed; use {args.norm.removeprefix('te_')!r}"
        )
    if not args.use_mup:
        return
    if not args.mup_base_width or args.mup_base_width < 1:
        problems.add(
            f"use_mup=True{args.where('use_mup')} needs mup_base_width, the hidden_size the "
            f"hyperparameters were tuned at (a positive int), got {args.mup_base_width!r}"
        )
    for key in ("mup_init_scale", "mup_output_temp", "mup_embedding_mult", "mup_attn_temp"):
        if getattr(args, key) <= 0:
            problems.add(f"{key} must be > 0, got {getattr(args, key)}{args.where(key)}")


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


def _check_blending(args: Any, problems: Problems) -> None:
    """Blending weights, label datasets and train_epochs against the data paths."""
    for s in ("train", "valid", "test"):
        paths = getattr(args, f"{s}_data_paths") or []
        key = f"{s}_label_data_paths"
        labels = getattr(args, key)
        if labels is not None and len(labels) != len(paths):
            problems.add(
                f"{key}{args.where(key)} lists {len(labels)} datasets but {s}_data_paths lists "
                f"{len(paths)}; labels match their data one to one"
            )
        key = f"{s}_data_weights"
        weights = getattr(args, key) or []
        numbers = [w for w in weights if isinstance(w, int | float) and not isinstance(w, bool)]
        valid = len(numbers) == len(weights) and all(w >= 0 for w in numbers)
        if not valid or (weights and not sum(numbers)):
            problems.add(
                f"{key}{args.where(key)} must be non-negative numbers with a positive sum, "
                f"got {weights!r}"
            )
    labels = args.label_data_paths
    if labels is not None and (args.data_path is None or len(labels) != 1):
        problems.add(
            f"label_data_paths{args.where('label_data_paths')} holds the one label dataset of "
            f"data_path, got {labels!r} with data_path={args.data_path!r} (with "
            "train_data_paths use train/valid/test_label_data_paths)"
        )
    if args.weighted_sampler_alpha < 0:
        problems.add(f"weighted_sampler_alpha must be >= 0, got {args.weighted_sampler_alpha}")
    train_paths = args.train_data_paths or []
    if args.train_epochs is not None and len(train_paths) > 1:
        problems.add(
            f"train_epochs{args.where('train_epochs')} needs one training dataset, but "
            f"train_data_paths lists {len(train_paths)}: a blend has no single epoch; set "
            "train_iters"
        )


def _check_attention(args: Any, problems: Problems) -> None:
    """GQA under tensor parallelism and the attention backends (megatron/model/positional.py
    checks pos_emb and rope_scaling)."""
    kv = args.num_kv_heads or args.num_attention_heads
    tp = max(args.model_parallel_size, 1)
    if kv and kv > 0 and kv % tp and tp % kv:
        problems.add(
            f"num_kv_heads ({kv}) and model_parallel_size ({tp}) must divide one another: "
            "each rank holds whole key/value groups, or ranks share a key/value head"
        )
    elif kv and kv > 0 and kv < tp and args.num_attention_heads and args.hidden_size:
        head_dim = args.hidden_size // args.num_attention_heads
        if head_dim % (tp // kv):
            problems.add(
                f"head_dim ({head_dim}) must be divisible by the {tp // kv} ranks sharing each "
                f"key/value head (model_parallel_size {tp} / num_kv_heads {kv})"
            )
    if args.te_mha and args.attention_backend not in ("sdpa", "te"):
        problems.add(
            f"te_mha{args.where('te_mha')} selects Transformer Engine attention but "
            f"attention_backend is {args.attention_backend!r}{args.where('attention_backend')}"
        )
    # flash-attn / Transformer Engine are checked when the model is built: the launching host
    # (a login node) may lack GPU packages that the workers have.


def _check_tensor_parallel(args: Any, problems: Problems) -> None:
    """Every split dimension divides by model_parallel_size (the vocabulary is padded to)."""
    tp = max(args.model_parallel_size, 1)
    if tp == 1:
        return
    heads = args.num_attention_heads
    if heads and heads > 0 and heads % tp:
        problems.add(
            f"num_attention_heads ({heads}) must be divisible by model_parallel_size ({tp}): "
            "each tensor-parallel rank holds whole heads"
        )
    if args.hidden_size and args.hidden_size > 0:
        width = ffn_sizes(args)[1]
        if width % tp:
            problems.add(
                f"the MLP width ({width}, from intermediate_size / expansion_factor) must be "
                f"divisible by model_parallel_size ({tp})"
            )
    if args.sequence_parallel and args.seq_length and args.seq_length % tp:
        problems.add(
            f"seq_length ({args.seq_length}) must be divisible by model_parallel_size ({tp}) "
            f"with sequence_parallel{args.where('sequence_parallel')}: between tensor-parallel "
            "regions each rank holds seq_length / model_parallel_size positions"
        )


def _check_train_impl(args: Any, problems: Problems) -> None:
    """DPO needs pairwise (pos_/neg_) data, KTO rewards; both are one document per sample."""
    impl, splits = args.train_impl, ("train", "valid", "test")
    if (impl == "dpo") != (args.dataset_impl == "pairwise"):
        problems.add(
            f"train_impl dpo and dataset_impl pairwise go together, got train_impl="
            f"{impl!r}, dataset_impl={args.dataset_impl!r}"
        )
    for s in splits:
        pos, neg = f"pos_{s}_data_paths", f"neg_{s}_data_paths"
        for key in (pos, neg, f"pos_{s}_label_data_paths", f"neg_{s}_label_data_paths"):
            if getattr(args, key) is not None and args.dataset_impl != "pairwise":
                problems.add(f"{key}{args.where(key)} is only read with dataset_impl pairwise")
        if args.dataset_impl == "pairwise" and (getattr(args, pos) is None) != (
            getattr(args, neg) is None
        ):
            problems.add(f"{pos} and {neg} go together (chosen and rejected documents)")
        reward = f"{s}_reward_data_paths"
        if getattr(args, reward) is not None and impl != "kto":
            problems.add(f"{reward}{args.where(reward)} is only read with train_impl kto")
        if impl == "kto" and (getattr(args, reward) is None) != (
            getattr(args, f"{s}_data_paths") is None
        ):
            problems.add(f"train_impl kto: {s}_data_paths needs {reward} (and vice versa)")
    if args.dataset_impl == "pairwise":
        if args.pos_train_data_paths is None:
            problems.add(
                "dataset_impl pairwise needs pos_train_data_paths and neg_train_data_paths"
            )
        for key in ("data_path", "train_data_paths", "valid_data_paths", "test_data_paths"):
            if getattr(args, key) is not None:
                problems.add(
                    f"{key}{args.where(key)} is not read with dataset_impl pairwise; "
                    "give pos_/neg_ data paths"
                )
    if impl in ("dpo", "kto") and args.precompute_model_name is not None:
        problems.add(
            f"precompute_model_name{args.where('precompute_model_name')}: precomputed reference "
            f"log-probs are not supported yet; train_impl {impl} runs a frozen reference model"
        )
    if impl in ("dpo", "kto") and args.train_epochs is not None:
        problems.add(
            f"train_epochs{args.where('train_epochs')} is not supported with train_impl "
            f"{impl}; set train_iters"
        )
    if impl in ("dpo", "kto") and args.pack_impl == "pack_until_overflow":
        problems.add(
            f"train_impl {impl} uses one document per sample; pack_impl "
            "pack_until_overflow is not supported with it (use unpacked)"
        )
    if impl == "kto":
        if args.data_path is not None:
            problems.add(
                "train_impl kto reads train/valid/test_data_paths with their "
                "*_reward_data_paths, not data_path"
            )
        micro = args.train_micro_batch_size_per_gpu
        if micro is not None and micro < 2:
            problems.add(
                f"train_impl kto needs train_micro_batch_size_per_gpu >= 2 (its KL "
                f"estimate uses the rest of the micro-batch), got {micro}"
            )
    for key in ("dpo_beta", "kto_beta"):
        if getattr(args, key) <= 0:
            problems.add(f"{key} must be > 0, got {getattr(args, key)}{args.where(key)}")
    for key in ("kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(args, key) < 0:
            problems.add(f"{key} must be >= 0, got {getattr(args, key)}{args.where(key)}")


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
        if path is None or os.path.isfile(path):
            continue
        # HFGPT2Tokenizer's vocab_file may be a tokenizer directory, as in NeoX.
        if key == "vocab_file" and os.path.isdir(path):
            continue
        problems.add(f"{key}{args.where(key)}: file not found: {path}")
