"""UTF-8 bytes as tokens: ids 0-255 are bytes, 256 is the end of document."""

from __future__ import annotations

import os

from megatron.tokenizer.base import Tokenizer
from megatron.tokenizer.registry import register_tokenizer


@register_tokenizer("bytes")
class ByteTokenizer(Tokenizer):
    """Needs no files; `vocab_file`/`merge_file` are accepted and ignored."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.eod = 256
        self.pad = 256
        self.vocab_size = 257

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids: list[int]) -> str:
        bad = [i for i in token_ids if not 0 <= i <= self.eod]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the bytes vocabulary 0..{self.eod}")
        # The EOD id has no text; a cut multi-byte character becomes U+FFFD.
        return bytes(i for i in token_ids if i != self.eod).decode("utf-8", errors="replace")
