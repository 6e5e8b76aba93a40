"""The dict handed to `deepspeed.initialize` (no optimizer or scheduler: Strata builds them)."""

from __future__ import annotations

import copy
from typing import Any

from megatron.neox_arguments.errors import ConfigError

# NeoX keys copied into the DeepSpeed config under the same name when not at NeoX's default.
PASS_THROUGH = (
    "fp32_allreduce",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "dump_state",
    "flops_profiler",
    "communication_data_type",
    "activation_checkpointing",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comms_logger",
    "data_types",
)
PASS_THROUGH_DEFAULTS: dict[str, Any] = {
    "fp32_allreduce": False,
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "sparse_gradients": False,
    "dump_state": False,
}

# NeoX's precision-dict quirks that DeepSpeed's strict schema rejects.
PRECISION_QUIRKS = ("fp16", "type")


def _precision_section(section: dict[str, Any] | None) -> dict[str, Any]:
    cleaned = {k: v for k, v in (section or {}).items() if k not in PRECISION_QUIRKS}
    cleaned["enabled"] = True
    return cleaned


def build_deepspeed_config(args: Any) -> dict[str, Any]:
    """DeepSpeed config with NeoX's semantics, from a validated NeoXArgs."""
    config: dict[str, Any] = {
        "train_batch_size": args.train_batch_size,
        "train_micro_batch_size_per_gpu": args.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.gradient_clipping,
        "zero_optimization": copy.deepcopy(args.zero_optimization),
        "steps_per_print": args.steps_per_print,
        "wall_clock_breakdown": args.wall_clock_breakdown,
        # The trainer passes its own optimizer object to DeepSpeed.
        "zero_allow_untested_optimizer": True,
    }
    if args.precision == "fp16":
        fp16 = args.fp16 if not str((args.fp16 or {}).get("type", "")).startswith("bf") else None
        config["fp16"] = _precision_section(fp16)
    elif args.precision == "bf16":
        config["bf16"] = _precision_section(args.bf16)
    for key in PASS_THROUGH:
        value = getattr(args, key)
        if value is None or value == PASS_THROUGH_DEFAULTS.get(key):
            continue
        config[key] = copy.deepcopy(value)
    for key, value in (args.deepspeed_extra_args or {}).items():
        if key in ("optimizer", "scheduler"):
            raise ConfigError(
                f"deepspeed_extra_args.{key}: Strata builds the {key} itself; use the NeoX keys"
            )
        if key in config:
            raise ConfigError(
                f"deepspeed_extra_args.{key} is already set from the NeoX config; set it once"
            )
        config[key] = copy.deepcopy(value)
    # Strata reports throughput itself; DeepSpeed's throughput timer would synchronize the
    # device at the start and end of every step (the host then waits instead of queueing work).
    config.setdefault("timers", {"throughput": {"enabled": False}})
    return config
