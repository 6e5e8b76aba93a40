"""The tokenizer registry: names to classes plus `register_tokenizer`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from megatron.registry import Registry
from megatron.tokenizer.base import Tokenizer

T = TypeVar("T", bound=type[Tokenizer])

# NeoX compares tokenizer_type case-insensitively.
TOKENIZERS: Registry[type[Tokenizer]] = Registry(
    "tokenizer_type", ignore_case=True, register_with="megatron.tokenizer.register_tokenizer"
)


def register_tokenizer(name: str) -> Callable[[T], T]:
    """Class decorator adding a tokenizer under `name`.

    The class is constructed as `cls(vocab_file=..., merge_file=...)` and sets `cls.name`.
    """

    def decorate(cls: T) -> T:
        TOKENIZERS.register(name, cls)
        cls.name = name
        return cls

    return decorate


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | os.PathLike[str] | None = None,
    merge_file: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Construct the registered tokenizer called `tokenizer_type` (case-insensitive)."""
    cls = TOKENIZERS.get(str(tokenizer_type))
    return cls(vocab_file=vocab_file, merge_file=merge_file)


def pad_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int, model_parallel_size: int
) -> int:
    """Round `vocab_size` up so every tensor-parallel shard of the embedding is equally sized."""
    for key, value in (
        ("vocab_size", vocab_size),
        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by),
        ("model_parallel_size", model_parallel_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    multiple = make_vocab_size_divisible_by * model_parallel_size
    return -(-vocab_size // multiple) * multiple
