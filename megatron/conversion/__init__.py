"""Hugging Face <-> Strata conversion: one declared name-and-layout map per architecture.

`maps.ARCHITECTURES` holds the maps (add one with `register_architecture`); the converters in
tools/ckpts/ read Hugging Face folders with `hf_io` and Strata checkpoints with `strata_io`.
"""

from megatron.conversion.hf_config import ConversionError
from megatron.conversion.layouts import Dims
from megatron.conversion.maps import (
    ARCHITECTURES,
    Architecture,
    TensorRule,
    architecture_for_hf_class,
    auto_architecture,
    register_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ConversionError",
    "Dims",
    "TensorRule",
    "architecture_for_hf_class",
    "auto_architecture",
    "register_architecture",
]
