"""GPT-2 through `transformers`' GPT2TokenizerFast, from local files (NeoX's HFGPT2Tokenizer)."""

from __future__ import annotations

import os
from typing import Any

from megatron.tokenizer.base import Tokenizer, require_file
from megatron.tokenizer.gpt2 import byte_level_bpe
from megatron.tokenizer.registry import register_tokenizer

PAD_TOKEN = "<|padding|>"  # NeoX adds it, so the vocabulary is one larger than GPT-2's
# What a tokenizer directory must hold (either set).
DIR_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
PathArg = str | os.PathLike[str] | None


def _load(name: str, vocab_file: PathArg, merge_file: PathArg) -> Any:
    """A GPT2TokenizerFast from a directory (`vocab_file`) or from vocab.json + merges.txt."""
    try:
        from transformers import GPT2TokenizerFast
    except ImportError as err:
        raise ValueError(
            f"tokenizer {name} needs the transformers package (pip install 'strata[hf]')"
        ) from err
    if vocab_file is not None and os.path.isdir(vocab_file):
        # NeoX passes vocab_file to from_pretrained; a hub name would need a download.
        folder = os.fspath(vocab_file)
        if not any(
            all(os.path.isfile(os.path.join(folder, f)) for f in files) for files in DIR_FILES
        ):
            raise FileNotFoundError(
                f"vocab_file {folder} for tokenizer {name} is a directory without "
                f"{' or '.join(' + '.join(files) for files in DIR_FILES)}"
            )
        try:
            return GPT2TokenizerFast.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # tokenizers' Rust side raises a bare Exception
            raise ValueError(
                f"vocab_file {folder} is not a valid GPT-2 tokenizer directory: {err}"
            ) from err
    if vocab_file is not None and not os.path.exists(vocab_file):
        raise FileNotFoundError(
            f"vocab_file for tokenizer {name} not found: {vocab_file} (a local directory or "
            "vocab.json is needed; hub names are not downloaded)"
        )
    vocab = require_file("vocab_file", vocab_file, name)
    merges = require_file("merge_file", merge_file, name)
    # tokenizer_object works with transformers 4 and 5 alike (their file arguments differ).
    return GPT2TokenizerFast(tokenizer_object=byte_level_bpe(vocab, merges))


@register_tokenizer("HFGPT2Tokenizer")
class HFGPT2Tokenizer(Tokenizer):
    """`vocab_file` is a directory holding the tokenizer files, or GPT-2's vocab.json with
    `merge_file` merges.txt. Special-token text such as `<|endoftext|>` encodes to its id."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._hf = _load(self.name, vocab_file, merge_file)
        self._hf.add_special_tokens({"pad_token": PAD_TOKEN})
        if self._hf.eos_token_id is None:
            raise ValueError(f"vocab_file {vocab_file} defines no eos token")
        self.vocab_size = len(self._hf)
        self.eod = self._hf.eos_token_id
        self.pad = self._hf.pad_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text)

    def detokenize(self, token_ids: list[int]) -> str:
        # No space clean-up, so detokenize(tokenize(text)) == text.
        return self._hf.decode(list(token_ids), clean_up_tokenization_spaces=False)
