"""NeoX's batch arithmetic: train_batch_size = micro batch x accumulation steps x data parallel."""

from __future__ import annotations

from megatron.neox_arguments.errors import ConfigError

TB, MB, GAS = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def _divide(numerator: int, denominator: int, what: str) -> int:
    if denominator <= 0 or numerator % denominator:
        raise ConfigError(what)
    return numerator // denominator


def resolve_batch(
    dp: int, train_batch: int | None, micro: int | None, gas: int | None
) -> tuple[int, int, int]:
    """(train_batch_size, micro batch, accumulation steps): any two give the third.

    With only one of train_batch_size / micro batch, accumulation is 1. Every inconsistency is
    a ConfigError that shows the numbers.
    """
    for name, value in ((TB, train_batch), (MB, micro), (GAS, gas)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if train_batch is not None and micro is not None and gas is not None:
        product = micro * gas * dp
        if train_batch != product:
            raise ConfigError(
                f"{TB} ({train_batch}) must equal {MB} x {GAS} x data_parallel_size = "
                f"{micro} x {gas} x {dp} = {product}"
            )
        return train_batch, micro, gas
    if train_batch is not None and micro is not None:
        what = (
            f"{TB} ({train_batch}) is not a positive multiple of {MB} x data_parallel_size = "
            f"{micro} x {dp} = {micro * dp}, so {GAS} cannot be derived"
        )
        return train_batch, micro, _divide(train_batch, micro * dp, what)
    if train_batch is not None:
        gas = gas or 1
        what = (
            f"{TB} ({train_batch}) is not a positive multiple of {GAS} x data_parallel_size = "
            f"{gas} x {dp} = {gas * dp}, so {MB} cannot be derived"
        )
        return train_batch, _divide(train_batch, gas * dp, what), gas
    if micro is not None:
        gas = gas or 1
        return micro * gas * dp, micro, gas
    raise ConfigError(f"set {MB} (and optionally {GAS}) or {TB}")
