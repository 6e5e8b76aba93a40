"""The short table of derived values printed before training."""

from __future__ import annotations

from typing import Any


def _count(value: int | None) -> str:
    if value is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value:,} ({value / scale:.2f}{suffix})"
    return f"{value:,}"


def derived_table(args: Any) -> str:
    """Aligned `name  value` lines: layout, batch arithmetic, schedule, sizes; then the notes on
    values derived from files."""
    tp, pp = max(args.model_parallel_size, 1), max(args.pipe_parallel_size, 1)
    decay = args.lr_decay_iters
    warmup = "n/a" if decay is None else f"{decay} / {int(args.warmup * decay)}"
    rows = [
        ("world size (global_num_gpus)", f"{args.global_num_gpus}"),
        ("data x tensor x pipe parallel", f"{args.data_parallel_size} x {tp} x {pp}"),
        (
            "train_batch_size",
            f"{args.train_batch_size} = {args.train_micro_batch_size_per_gpu} (micro) x "
            f"{args.gradient_accumulation_steps} (accumulation) x {args.data_parallel_size} (data "
            "parallel)",
        ),
        ("seq_length", f"{args.seq_length}"),
        ("tokens per step", _count(args.tokens_per_step)),
        (
            "train_iters",
            "n/a (train_epochs)" if args.train_iters is None else f"{args.train_iters:,}",
        ),
        ("total tokens", _count(args.total_tokens)),
        ("learning rate", f"{args.lr:g} -> {args.min_lr:g} ({args.lr_decay_style})"),
        ("lr_decay_iters / warmup iters", warmup),
        ("precision / ZeRO stage", f"{args.precision} / {args.zero_stage}"),
        (
            "padded vocab size",
            "n/a" if args.padded_vocab_size is None else f"{args.padded_vocab_size:,}",
        ),
        ("parameters", _count(args.num_parameters)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join([*lines, *args.notes])
