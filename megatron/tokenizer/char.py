"""NeoX's CharLevelTokenizer: the UTF-8 bytes of the text as ids, in a vocabulary of 512."""

from __future__ import annotations

import os

from megatron.tokenizer.base import Tokenizer
from megatron.tokenizer.registry import register_tokenizer

VOCAB_SIZE = 512  # NeoX's fixed size; ids 256-511 are never produced by tokenize
EOD = 0
PAD = 1


@register_tokenizer("CharLevelTokenizer")
class CharLevelTokenizer(Tokenizer):
    """Ids are NeoX's: one per UTF-8 byte (`ord(c)` for ASCII), end of document 0, padding 1.

    Needs no files. NeoX's detokenize maps each id to `chr(max(32, id))`, which turns newlines
    into spaces and mangles non-ASCII text; this one decodes the bytes as UTF-8 instead, so text
    round-trips. Ids 0 and 1 double as NUL and SOH bytes in NeoX; here they decode to nothing.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.vocab_size = VOCAB_SIZE
        self.eod = EOD
        self.pad = PAD

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids: list[int]) -> str:
        ids = [int(i) for i in token_ids]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the character vocabulary 0..{VOCAB_SIZE - 1}"
            )
        # Ids past the byte range (a model may sample them) have no text: U+FFFD via the decoder.
        data = bytes(i if i < 256 else 0xFF for i in ids if i not in (EOD, PAD))
        return data.decode("utf-8", errors="replace")
