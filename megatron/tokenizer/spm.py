"""A SentencePiece `.model` file (NeoX's SPMTokenizer)."""

from __future__ import annotations

import os

import sentencepiece

from megatron.tokenizer.base import Tokenizer, require_file
from megatron.tokenizer.registry import register_tokenizer

# NeoX looks this piece up first; models trained without it end documents with their eos piece.
EOD_PIECE = "<|endoftext|>"


@register_tokenizer("SPMTokenizer")
class SPMTokenizer(Tokenizer):
    """Encodes with the model's own settings (no bos/eos added), as NeoX does.

    `vocab_file` is the `.model` file; `merge_file` is ignored.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        path = require_file("vocab_file", vocab_file, self.name)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"vocab_file {path} is not a SentencePiece model: {err}") from err
        self.vocab_size = self._sp.get_piece_size()
        eod = self._sp.piece_to_id(EOD_PIECE)
        # piece_to_id answers the unk id for a piece the model lacks.
        if self._sp.id_to_piece(eod) != EOD_PIECE:
            eod = self._sp.eos_id()
        if eod < 0:
            raise ValueError(
                f"vocab_file {path} has no end-of-document piece: neither {EOD_PIECE} nor an eos id"
            )
        self.eod = eod
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 else eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, token_ids: list[int]) -> str:
        ids = [int(i) for i in token_ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the SentencePiece vocabulary 0..{self.vocab_size - 1}"
            )
        # Control pieces (bos, eos, pad) decode to nothing; unknown pieces to " ⁇ ".
        return self._sp.decode(ids)
