"""Environment report: `python -m megatron.doctor`.

Prints what a training run will find on this machine: torch and its CUDA/NCCL, DeepSpeed and its
compatible ops, the optional GPU packages, and the CPU count.
"""

from __future__ import annotations

import importlib
import os
import platform


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # an optional package may fail to import in many ways
        return f"not available ({type(err).__name__})"


def _deepspeed_ops() -> str:
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS

        usable = sorted(name for name, builder in ALL_OPS.items() if builder.is_compatible(False))
        return ", ".join(usable) or "none"
    except Exception as err:
        return f"unknown ({type(err).__name__}: {err})"


def report() -> list[tuple[str, str]]:
    import torch

    rows = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("cpus", str(os.cpu_count())),
        ("torch", torch.__version__),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        rows += [
            ("cuda (torch build)", str(torch.version.cuda)),
            (
                "gpus",
                ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())),
            ),
            ("nccl", ".".join(map(str, torch.cuda.nccl.version()))),
        ]
    rows += [
        ("deepspeed", _version("deepspeed")),
        ("deepspeed ops (compatible)", _deepspeed_ops()),
        ("flash-attn", _version("flash_attn")),
        ("transformer-engine", _version("transformer_engine")),
        ("transformers", _version("transformers")),
        ("tokenizers", _version("tokenizers")),
        ("STRATA_ASSETS", os.environ.get("STRATA_ASSETS", "unset")),
    ]
    return rows


def main() -> None:
    rows = report()
    width = max(len(name) for name, _ in rows)
    print("Strata environment")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
