"""Tokenizers by name: `build_tokenizer(tokenizer_type, vocab_file, merge_file)`."""

# Importing the implementations registers them.
from megatron.tokenizer import byte, char, gpt2, hf, hf_gpt2, spm, tiktoken_bpe  # noqa: F401
from megatron.tokenizer.base import Tokenizer
from megatron.tokenizer.registry import (
    TOKENIZERS,
    build_tokenizer,
    pad_vocab_size,
    register_tokenizer,
)

__all__ = ["TOKENIZERS", "Tokenizer", "build_tokenizer", "pad_vocab_size", "register_tokenizer"]
