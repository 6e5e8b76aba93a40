"""Tokenizer registry, GPT-2 BPE, HF tokenizer.json, bytes, and vocab padding."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.tokenizer import (
    TOKENIZERS,
    Tokenizer,
    build_tokenizer,
    pad_vocab_size,
    register_tokenizer,
)

TRICKY = "Hello world!\n\n  Tabs\tand émoji 🙂, 数字 123 — it's <|endoftext|> done.  "


@pytest.fixture
def gpt2(assets: Path) -> Tokenizer:
    return build_tokenizer(
        "GPT2BPETokenizer",
        vocab_file=assets / "tokenizers/gpt2-vocab.json",
        merge_file=assets / "tokenizers/gpt2-merges.txt",
    )


def test_gpt2_known_ids(gpt2: Tokenizer) -> None:
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert gpt2.eod == 50256
    assert gpt2.pad == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.name == "GPT2BPETokenizer"


def test_gpt2_round_trip_and_literal_eod_text(gpt2: Tokenizer) -> None:
    ids = gpt2.tokenize(TRICKY)
    assert gpt2.detokenize(ids) == TRICKY
    # As in OpenAI's encoder, the EOD string in raw text is ordinary text, not the EOD id.
    assert gpt2.eod not in ids
    assert gpt2.detokenize([gpt2.eod]) == "<|endoftext|>"


def test_hf_tokenizer_json(assets: Path) -> None:
    tok = build_tokenizer("HFTokenizer", assets / "tokenizers/gpt-neox-20b-pii-special.json")
    assert tok.vocab_size == 50280
    assert tok.eod == 0  # <|endoftext|>
    assert tok.pad == 1  # <|padding|>
    ids = tok.tokenize(TRICKY)
    assert tok.detokenize(ids) == TRICKY
    assert tok.tokenize("<|endoftext|>") == [tok.eod]


def test_bytes_tokenizer() -> None:
    tok = build_tokenizer("bytes")
    assert (tok.vocab_size, tok.eod, tok.pad) == (257, 256, 256)
    assert tok.tokenize("hé") == [104, 195, 169]
    assert tok.detokenize(tok.tokenize(TRICKY) + [tok.eod]) == TRICKY
    assert tok.detokenize([104, 195]) == "h\ufffd"  # a cut character is replaced, not an error
    with pytest.raises(ValueError, match="outside the bytes vocabulary"):
        tok.detokenize([300])


def test_lookup_is_case_insensitive() -> None:
    assert build_tokenizer("BYTES").name == "bytes"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((50257, 128, 1), 50304),
        ((50257, 128, 2), 50432),
        ((50280, 128, 4), 50688),
        ((256, 128, 1), 256),
        ((257, 1, 1), 257),
    ],
)
def test_pad_vocab_size(args: tuple[int, int, int], expected: int) -> None:
    padded = pad_vocab_size(*args)
    assert padded == expected
    assert padded % (args[1] * args[2]) == 0


@pytest.mark.parametrize("args", [(0, 128, 1), (100, 0, 1), (100, 128, -1), (100.0, 128, 1)])
def test_pad_vocab_size_rejects_bad_values(args: tuple) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        pad_vocab_size(*args)


def test_unknown_type_lists_registered_names() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer_type 'Nope'") as info:
        build_tokenizer("Nope")
    for name in ("GPT2BPETokenizer", "HFTokenizer", "bytes"):
        assert name in str(info.value)


def test_missing_files_name_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="vocab_file") as info:
        build_tokenizer("HFTokenizer", vocab_file=missing)
    assert str(missing) in str(info.value)

    vocab = tmp_path / "vocab.json"
    vocab.write_text("{}")
    with pytest.raises(FileNotFoundError, match="merge_file") as info:
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=tmp_path / "m.txt")
    assert str(tmp_path / "m.txt") in str(info.value)

    with pytest.raises(ValueError, match="needs vocab_file"):
        build_tokenizer("GPT2BPETokenizer")


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match=str(bad)):
        build_tokenizer("HFTokenizer", vocab_file=bad)


def test_register_a_user_tokenizer() -> None:
    @register_tokenizer("TestUpperBytes")
    class Upper(Tokenizer):
        def __init__(self, vocab_file=None, merge_file=None) -> None:
            self.vocab_size, self.eod, self.pad = 258, 256, 257

        def tokenize(self, text: str) -> list[int]:
            return list(text.upper().encode())

        def detokenize(self, token_ids: list[int]) -> str:
            return bytes(token_ids).decode()

    try:
        tok = build_tokenizer("testupperbytes")
        assert isinstance(tok, Upper)
        assert tok.name == "TestUpperBytes"
        assert tok.detokenize(tok.tokenize("ab")) == "AB"
        with pytest.raises(ValueError, match="already registered"):
            register_tokenizer("TestUpperBytes")(Upper)
    finally:
        del TOKENIZERS["testupperbytes"]
