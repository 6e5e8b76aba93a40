"""The interface every tokenizer implements, and the file checks they share."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod


class Tokenizer(ABC):
    """A text <-> token-id mapping with an end-of-document id and a padding id.

    Subclasses set `name`, `vocab_size` (unpadded, special tokens included), `eod` and `pad`.
    """

    name: str
    vocab_size: int
    eod: int
    pad: int

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document id appended)."""

    @abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """Text of `token_ids`; special tokens are kept as text."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def require_file(key: str, path: str | os.PathLike[str] | None, tokenizer_name: str) -> str:
    """Return `path` as a string, or raise naming the config key when it is unset or missing."""
    if path is None:
        raise ValueError(f"tokenizer {tokenizer_name} needs {key}, but {key} is not set")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} for tokenizer {tokenizer_name} not found: {path}")
    return path
