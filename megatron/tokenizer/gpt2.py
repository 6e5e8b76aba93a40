"""GPT-2 byte-level BPE from the original `vocab.json` + `merges.txt` (NeoX's GPT2BPETokenizer)."""

from __future__ import annotations

import os

from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers

from megatron.tokenizer.base import Tokenizer, require_file
from megatron.tokenizer.registry import register_tokenizer

EOD_TOKEN = "<|endoftext|>"


def byte_level_bpe(vocab: str, merges: str) -> HFBackend:
    """GPT-2's pipeline (byte-level pre-tokenizer and decoder) over vocab.json + merges.txt."""
    try:
        model = models.BPE.from_file(vocab, merges)
    except Exception as err:  # the Rust side raises a bare Exception
        raise ValueError(
            f"could not read GPT-2 BPE files vocab_file={vocab} merge_file={merges}: {err}"
        ) from err
    backend = HFBackend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


@register_tokenizer("GPT2BPETokenizer")
class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE; `<|endoftext|>` in text is encoded literally, as OpenAI's encoder does."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        vocab = require_file("vocab_file", vocab_file, self.name)
        merges = require_file("merge_file", merge_file, self.name)
        self._backend = byte_level_bpe(vocab, merges)
        eod = self._backend.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"vocab_file {vocab} has no {EOD_TOKEN} token")
        self.vocab_size = self._backend.get_vocab_size()
        self.eod = eod
        self.pad = eod

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, token_ids: list[int]) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=False)
