"""A Hugging Face `tokenizer.json` (NeoX's HFTokenizer)."""

from __future__ import annotations

import os

from tokenizers import Tokenizer as HFBackend

from megatron.tokenizer.base import Tokenizer, require_file
from megatron.tokenizer.registry import register_tokenizer

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
PAD_TOKEN = "<|padding|>"


@register_tokenizer("HFTokenizer")
class HFTokenizer(Tokenizer):
    """Encodes with the file's own pipeline (normalizer, pre-tokenizer, post-processor)."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        path = require_file("vocab_file", vocab_file, self.name)
        try:
            self._backend = HFBackend.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"vocab_file {path} is not a valid tokenizer.json: {err}") from err
        eod = next(
            (i for i in map(self._backend.token_to_id, EOD_CANDIDATES) if i is not None), None
        )
        if eod is None:
            raise ValueError(
                f"vocab_file {path} has no end-of-document token; expected one of {EOD_CANDIDATES}"
            )
        pad = self._backend.token_to_id(PAD_TOKEN)
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self.eod = eod
        self.pad = eod if pad is None else pad

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text).ids

    def detokenize(self, token_ids: list[int]) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=False)
