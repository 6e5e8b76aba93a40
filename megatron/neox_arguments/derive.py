"""Values computed from the config: world and batch sizes, precision, schedule, defaults."""

from __future__ import annotations

import copy
import os
import subprocess
from typing import Any

from megatron.neox_arguments import rules
from megatron.neox_arguments.batch import resolve_batch
from megatron.neox_arguments.errors import ConfigError, Problems
from megatron.neox_arguments.memory import parse_bytes
from megatron.neox_arguments.resources import local_device_count, resolve_hosts
from megatron.neox_arguments.sizes import ffn_sizes, parameter_counts
from megatron.neox_arguments.typecheck import convert_numeric_strings

# DeepSpeed's ZeRO defaults, which NeoX writes out when zero_optimization is unset.
ZERO_DEFAULTS: dict[str, Any] = {
    "stage": 0,
    "allgather_partitions": True,
    "reduce_scatter": True,
    "allgather_bucket_size": 500_000_000,
    "overlap_comm": False,
    "reduce_bucket_size": 500_000_000,
    "contiguous_gradients": False,
}

# NeoX's optimizer when none is configured.
OPTIMIZER_DEFAULT: dict[str, Any] = {
    "type": "Adam",
    "params": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1.0e-8},
}

# Dict keys whose nested "3e-4"-style strings are numbers.
NUMERIC_DICTS = (
    "optimizer",
    "fp16",
    "bf16",
    "zero_optimization",
    "flops_profiler",
    "activation_checkpointing",
    "comms_logger",
    "data_types",
    "deepspeed_extra_args",
)


def derive_all(args: Any, problems: Problems, resolve_resources: bool = True) -> None:
    """Fill every derived value that needs no files; inconsistencies go to `problems`.

    `resolve_resources=False` (inside launched processes) skips reading the hostfile: the
    world size is already in the config.
    """
    for key in NUMERIC_DICTS:
        setattr(args, key, convert_numeric_strings(getattr(args, key)))
    args.hosts = None
    if resolve_resources:
        try:
            args.hosts, warnings = resolve_hosts(
                args.hostfile, args.include, args.exclude, args.num_nodes
            )
            args.warnings.extend(warnings)
        except ConfigError as exc:
            problems.messages.extend(exc.problems)
    for step in (
        _world,
        _batch,
        _precision,
        _optimizer,
        _zero,
        _schedule,
        attention_types,
        _data_weights,
        _misc,
    ):
        try:
            step(args)
        except ConfigError as exc:
            problems.messages.extend(exc.problems)


def _world(args: Any) -> None:
    hosts = args.hosts
    num_gpus = args.num_gpus if args.num_gpus and args.num_gpus > 0 else None
    if args.global_num_gpus is None:
        if hosts is not None:
            counts = [num_gpus or len(slots) for slots in hosts.values()]
            args.global_num_gpus = sum(counts)
        else:
            nodes = args.num_nodes if args.num_nodes > 0 else 1
            args.global_num_gpus = (num_gpus or local_device_count()) * nodes
    elif args.global_num_gpus <= 0:
        raise ConfigError(f"global_num_gpus must be positive, got {args.global_num_gpus}")
    world = args.global_num_gpus
    tp = max(args.model_parallel_size, 1)
    pp = max(args.pipe_parallel_size, 1)
    if world % (tp * pp):
        raise ConfigError(
            f"world size (global_num_gpus = {world}) must be divisible by model_parallel_size x "
            f"pipe_parallel_size = {tp} x {pp} = {tp * pp}: {world} / {tp * pp} = "
            f"{world / (tp * pp):g}"
        )
    args.data_parallel_size = world // (tp * pp)
    args.is_pipe_parallel = args.pipe_parallel_size >= 2


# Entry points that only run forward passes: without batch keys they take one sample per rank.
INFERENCE_SCRIPTS = ("generate.py", "eval.py")


def _batch(args: Any) -> None:
    if args.data_parallel_size is None:
        return  # the world size was inconsistent; that error is already reported
    unset = (args.train_batch_size, args.train_micro_batch_size_per_gpu)
    if unset == (None, None) and os.path.basename(args.user_script or "") in INFERENCE_SCRIPTS:
        args.train_micro_batch_size_per_gpu = 1
    micro = args.train_micro_batch_size_per_gpu
    if micro == "auto":
        where = args.where("train_micro_batch_size_per_gpu")
        if args.train_batch_size is None or args.gradient_accumulation_steps is not None:
            raise ConfigError(
                f"train_micro_batch_size_per_gpu: auto{where} needs train_batch_size set and "
                "gradient_accumulation_steps unset (it derives the accumulation)"
            )
        if not 0 < args.auto_batch_memory_fraction <= 1:
            raise ConfigError(
                "auto_batch_memory_fraction must be in (0, 1], got "
                f"{args.auto_batch_memory_fraction}"
            )
        # Provisionally the whole per-rank batch; sized once the model's size is known.
        args.auto_micro_batch, micro = True, None
    (
        args.train_batch_size,
        args.train_micro_batch_size_per_gpu,
        args.gradient_accumulation_steps,
    ) = resolve_batch(
        args.data_parallel_size,
        args.train_batch_size,
        micro,
        args.gradient_accumulation_steps,
    )


def _precision(args: Any) -> None:
    fp16, bf16 = args.fp16 or {}, args.bf16 or {}
    # NeoX quirk: "fp16": {"type": "bfloat16"} selects bf16.
    fp16_means_bf16 = str(fp16.get("type", "")).lower() in ("bfloat16", "bf16")
    fp16_on = bool(fp16.get("enabled", False)) and not fp16_means_bf16
    bf16_on = bool(bf16.get("enabled", False)) or fp16_means_bf16
    if fp16_on and bf16_on:
        raise ConfigError("fp16.enabled and bf16.enabled are both true; choose one precision")
    from_dicts = "fp16" if fp16_on else "bf16" if bf16_on else None
    requested = {"bfloat16": "bf16"}.get(args.precision, args.precision)
    if requested and from_dicts and requested != from_dicts:
        raise ConfigError(
            f"precision {args.precision!r}{args.where('precision')} contradicts "
            f"the {from_dicts} dict, which enables {from_dicts}"
        )
    args.precision = requested or from_dicts or "fp32"
    if args.precision == "fp16":
        args.dynamic_loss_scale = fp16.get("loss_scale", 0) == 0


def _optimizer(args: Any) -> None:
    if args.optimizer is None:
        args.optimizer = copy.deepcopy(OPTIMIZER_DEFAULT)
    where = args.where("optimizer")
    opt = args.optimizer
    if not isinstance(opt.get("type"), str):
        raise ConfigError(f"optimizer{where} needs a string 'type', e.g. 'Adam'")
    params = opt.setdefault("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"optimizer.params{where} must be a dict, got {params!r}")
    lr = params.setdefault("lr", OPTIMIZER_DEFAULT["params"]["lr"])
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError(f"optimizer.params.lr{where} must be a positive number, got {lr!r}")
    args.lr = float(lr)
    args.optimizer_type = opt["type"]
    betas = params.get("betas")
    if betas is not None and not (
        isinstance(betas, list)
        and len(betas) == 2
        and all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(
            f"optimizer.params.betas{where} must be two numbers in [0, 1), got {betas!r}"
        )


def _zero(args: Any) -> None:
    if args.zero_optimization is None:
        args.zero_optimization = copy.deepcopy(ZERO_DEFAULTS)
    zero = args.zero_optimization
    stage = zero.get("stage", 0)
    where = args.where("zero_optimization")
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError(f"zero_optimization.stage{where} must be 0, 1, 2 or 3, got {stage!r}")
    # ZeRO 2/3 partition gradients/parameters across data-parallel ranks, which DeepSpeed's
    # pipeline engine cannot do and Strata's tensor-parallel layers do not support.
    parallel = {k: getattr(args, k) for k in ("model_parallel_size", "pipe_parallel_size")}
    if stage >= 2 and any(v > 1 for v in parallel.values()):
        raise ConfigError(
            f"zero_optimization.stage={stage}{where} cannot be combined with "
            + ", ".join(f"{k}={v}" for k, v in parallel.items())
            + ": ZeRO stages 2 and 3 are for pure data parallelism; use stage 0 or 1 with "
            "tensor or pipeline parallelism"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(f"zero_optimization.{key}{where}: ZeRO offload is not supported yet")
    for key in ("cpu_offload", "cpu_offload_params"):
        if zero.get(key):
            raise ConfigError(f"zero_optimization.{key}{where}: ZeRO offload is not supported yet")
    args.zero_stage = stage
    args.zero_reduce_scatter = zero.get("reduce_scatter", ZERO_DEFAULTS["reduce_scatter"])
    args.zero_contiguous_gradients = zero.get(
        "contiguous_gradients", ZERO_DEFAULTS["contiguous_gradients"]
    )
    args.zero_reduce_bucket_size = zero.get(
        "reduce_bucket_size", ZERO_DEFAULTS["reduce_bucket_size"]
    )
    args.zero_allgather_bucket_size = zero.get(
        "allgather_bucket_size", ZERO_DEFAULTS["allgather_bucket_size"]
    )


def _schedule(args: Any) -> None:
    if args.lr_decay_fraction is not None:
        if not 0 < args.lr_decay_fraction <= 1:
            raise ConfigError(f"lr_decay_fraction must be in (0, 1], got {args.lr_decay_fraction}")
        if args.train_iters is not None:
            from_fraction = int(args.lr_decay_fraction * args.train_iters)
            if args.lr_decay_iters not in (None, from_fraction):
                raise ConfigError(
                    f"lr_decay_iters ({args.lr_decay_iters}) contradicts lr_decay_fraction x "
                    f"train_iters = {args.lr_decay_fraction} x {args.train_iters} = "
                    f"{from_fraction}; set only one"
                )
            args.lr_decay_iters = from_fraction
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    args.save_iters = _save_iters(args)


def _save_iters(args: Any) -> list[int] | None:
    if args.train_iters is None:
        return None
    iters = {int(i) for i in args.extra_save_iters or []}
    factor = args.checkpoint_factor
    # 0, negative or unset: no periodic saves (the run still saves when it ends).
    if factor and factor > 0:
        if args.checkpoint_scale == "log" and factor <= 1:
            raise ConfigError(
                f"checkpoint_factor must be > 1 with checkpoint_scale log, got {factor}"
            )
        step: float = factor
        while step < args.train_iters:
            iters.add(int(step))
            step = step * factor if args.checkpoint_scale == "log" else step + factor
    return sorted(iters)


ATTENTION_TYPES = (
    "global",
    "local",
    "sparse_fixed",
    "sparse_variable",
    "bigbird",
    "bslongformer",
    "gmlp",
    "amlp",
    "flash",
    "rwkv",
    "mamba",
)


def attention_types(args: Any) -> None:
    """attention_config expanded to one attention type per layer."""
    layers = args.num_layers
    if layers is None:
        return
    config = args.attention_config or [[["global"], layers]]
    if all(isinstance(item, str) for item in config):
        expanded = list(config)  # already one entry per layer (e.g. from the launcher's JSON)
    else:
        expanded = []
        for item in config:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)):
                raise ConfigError(
                    f"attention_config entries must be [[types...], count], got {item!r}"
                )
            kinds, count = item
            if count == "all":
                if layers % len(kinds):
                    raise ConfigError(
                        f"attention_config {item!r}: num_layers ({layers}) is not a multiple "
                        f"of {len(kinds)} types"
                    )
                count = layers // len(kinds)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigError(f"attention_config {item!r}: count must be an int or 'all'")
            expanded.extend(kinds * count)
    if len(expanded) != layers:
        raise ConfigError(
            f"attention_config describes {len(expanded)} layers but num_layers is {layers}"
        )
    unknown = sorted({k for k in expanded if k not in ATTENTION_TYPES})
    if unknown:
        raise ConfigError(
            f"attention_config: unknown attention types {unknown}; expected {list(ATTENTION_TYPES)}"
        )
    unsupported = sorted({k for k in expanded if k not in ("global", "flash")})
    if unsupported:
        raise ConfigError(
            f"attention_config: attention types {unsupported} are not supported yet "
            "(only global and flash attention)"
        )
    if args.sparsity_config:
        raise ConfigError("sparsity_config: sparse attention is not supported yet")
    args.attention_config = expanded


def _data_weights(args: Any) -> None:
    for split in ("train", "valid", "test"):
        paths = getattr(args, f"{split}_data_paths")
        weights = getattr(args, f"{split}_data_weights")
        if paths and weights is None:
            setattr(args, f"{split}_data_weights", [1.0] * len(paths))
        elif paths and len(weights) != len(paths):
            raise ConfigError(
                f"{split}_data_weights has {len(weights)} entries but {split}_data_paths has "
                f"{len(paths)}"
            )


def _misc(args: Any) -> None:
    if args.text_gen_type is None:
        args.text_gen_type = "input-file" if args.sample_input_file else "unconditional"
    if args.hidden_size:
        args.ffn_hidden_size = ffn_sizes(args)[1]
    if args.data_impl == "infer":
        # NeoX infers the format from the files; Strata reads only mmap (MMIDIDX) datasets.
        args.data_impl = "mmap"
    if args.launcher in ("slurm", "srun"):
        # Processes started by Slurm find their rank in Slurm's environment.
        args.deepspeed_slurm = True
    if args.launcher == "openmpi":
        args.deepspeed_mpi = True
    if args.git_hash is None:
        args.git_hash = _git_hash()
    if args.device_memory:
        parse_bytes(args.device_memory)  # a malformed size fails here, naming the key


def _git_hash() -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "-C", repo, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def derive_vocab(args: Any) -> None:
    """padded_vocab_size from the tokenizer (imported lazily: it may load large files); with
    `load`, the size the checkpoint's model has, whenever this layout can split it."""
    from megatron.tokenizer import build_tokenizer, pad_vocab_size

    where = args.where("tokenizer_type")
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"tokenizer_type {args.tokenizer_type!r}{where}: cannot build the tokenizer: {exc}"
        ) from None
    tp = max(args.model_parallel_size, 1)
    padded = pad_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, tp)
    folder, recorded = _checkpoint_vocab(args.load, args.iteration)
    if recorded is not None and recorded != padded:
        # The padding belongs to the model, not to the layout it was trained in.
        if recorded < tokenizer.vocab_size or recorded % tp:
            raise ConfigError(
                f"load: {folder} has a padded vocabulary of {recorded} rows, which "
                f"model_parallel_size {tp} cannot split evenly or which is smaller than the "
                f"tokenizer's {tokenizer.vocab_size} tokens"
            )
        args.warnings.append(
            f"padded_vocab_size: {recorded} rows, as in {folder} (this tokenizer and "
            f"make_vocab_size_divisible_by pad to {padded} at model_parallel_size {tp})"
        )
        padded = recorded
    args.padded_vocab_size = padded


def _checkpoint_vocab(load: str | None, iteration: int | None) -> tuple[Any, int | None]:
    """(folder, padded vocabulary) of the checkpoint `load` (and `iteration`) names; (None,
    None) when there is none to read (the run reports a bad `load` itself)."""
    from megatron.checkpoint import (
        CheckpointError,
        padded_vocab_size,
        read_metadata,
        resolve_checkpoint,
    )

    if not load:
        return None, None
    try:
        folder = resolve_checkpoint(load, iteration)
        return folder, padded_vocab_size(read_metadata(folder))
    except CheckpointError:
        return None, None


def derive_train_iters(args: Any) -> None:
    """train_iters from train_epochs and the training data's index (read by the data code's
    "train_iters_for_epochs" reader: the most whole steps within the epochs), then what follows
    from it; the arithmetic goes to `args.notes`."""
    try:
        iters, per_epoch, total = rules.reader("train_iters_for_epochs")(args)
    except ValueError as err:  # DatasetError: the data cannot give train_epochs
        raise ConfigError(f"train_epochs{args.where('train_epochs')}: {err}") from None
    args.train_iters = iters
    _schedule(args)
    args.notes.append(
        f"train_epochs={args.train_epochs}: {total:,} samples ({per_epoch:,} per epoch) / "
        f"train_batch_size {args.train_batch_size} -> train_iters={iters:,}"
    )


def derive_sizes(args: Any) -> None:
    """Parameter count and token counts (once the vocabulary is known)."""
    if args.padded_vocab_size is not None and args.hidden_size:
        args.num_parameters = parameter_counts(args)["total"]
    if args.train_batch_size and args.seq_length:
        args.tokens_per_step = args.train_batch_size * args.seq_length
        if args.train_iters is not None:
            args.total_tokens = args.tokens_per_step * args.train_iters
