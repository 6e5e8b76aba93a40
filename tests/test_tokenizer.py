"""Tokenizer registry, every NeoX tokenizer_type on the real asset files, and vocab padding.

Expected ids come from the reference libraries themselves (tiktoken's own cl100k definition,
sentencepiece's processor, GPT-2's tokenizer), never from Strata's wrappers.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
from _config_fixtures import small_config, write_dataset

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.tokenizer import (
    TOKENIZERS,
    Tokenizer,
    build_tokenizer,
    pad_vocab_size,
    register_tokenizer,
)

pytestmark = pytest.mark.timeout(120)

TRICKY = "Hello world!\n\n  Tabs\tand émoji 🙂, 数字 123 — it's <|endoftext|> done.  "
# Without the special-token text: for comparing with encoders that treat it differently.
PLAIN_UNICODE = "Tabs\tand émoji 🙂, 数字 123 — naïve café.\n\n  indented  "


@pytest.fixture(scope="module")
def brown(assets: Path) -> list[str]:
    """A few real documents from the Brown corpus (ASCII), plus unicode text."""
    with open(assets / "corpora/brown.jsonl", encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"] for _ in range(4)]
    return docs + [docs[0][:2000] + " " + PLAIN_UNICODE]


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


# --------------------------------------------------------------------------- HFGPT2Tokenizer


@pytest.fixture(scope="module")
def gpt2_files(assets: Path) -> tuple[Path, Path]:
    return assets / "tokenizers/gpt2-vocab.json", assets / "tokenizers/gpt2-merges.txt"


def test_hf_gpt2_neox_semantics(gpt2_files: tuple[Path, Path], gpt2: Tokenizer) -> None:
    tok = build_tokenizer("HFGPT2Tokenizer", *gpt2_files)
    assert tok.tokenize("Hello world") == [15496, 995]
    # NeoX adds <|padding|> after GPT-2's 50,257 tokens.
    assert (tok.vocab_size, tok.eod, tok.pad) == (50258, 50256, 50257)
    # transformers treats special-token text as the special token.
    assert tok.tokenize("a<|endoftext|>b<|padding|>") == [64, 50256, 65, 50257]
    assert tok.detokenize(tok.tokenize(TRICKY)) == TRICKY


def test_hf_gpt2_matches_gpt2_bpe(
    gpt2_files: tuple[Path, Path], gpt2: Tokenizer, brown: list[str], tmp_path: Path
) -> None:
    from_files = build_tokenizer("HFGPT2Tokenizer", *gpt2_files)
    # NeoX's other form: a tokenizer directory, as from_pretrained reads it.
    shutil.copy(gpt2_files[0], tmp_path / "vocab.json")
    shutil.copy(gpt2_files[1], tmp_path / "merges.txt")
    from_dir = build_tokenizer("HFGPT2Tokenizer", tmp_path)
    for doc in brown:
        expected = gpt2.tokenize(doc)
        assert from_files.tokenize(doc) == expected
        assert from_dir.tokenize(doc) == expected
        assert from_files.detokenize(expected) == doc


def test_hf_gpt2_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vocab_file .*hub names are not downloaded"):
        build_tokenizer("HFGPT2Tokenizer", "gpt2")
    with pytest.raises(FileNotFoundError, match="without vocab.json \\+ merges.txt") as info:
        build_tokenizer("HFGPT2Tokenizer", tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=f"vocab_file {tmp_path} is not a valid"):
        build_tokenizer("HFGPT2Tokenizer", tmp_path)
    with pytest.raises(ValueError, match="could not read GPT-2 BPE files vocab_file="):
        build_tokenizer("HFGPT2Tokenizer", tmp_path / "vocab.json", tmp_path / "merges.txt")


# --------------------------------------------------------------------------- SPMTokenizer


def test_spm_matches_sentencepiece(assets: Path, brown: list[str]) -> None:
    model = assets / "tokenizers/mistral-7b-v0.1.model"
    tok = build_tokenizer("SPMTokenizer", model)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
    assert tok.vocab_size == reference.get_piece_size() == 32000
    # No <|endoftext|> piece: documents end with the model's eos (</s>); no pad piece either.
    assert (tok.eod, tok.pad) == (reference.eos_id(), reference.eos_id()) == (2, 2)
    assert reference.id_to_piece(tok.eod) == "</s>"
    for doc in [*brown, TRICKY]:
        ids = tok.tokenize(doc)
        assert ids == reference.encode(doc)
        assert tok.detokenize(ids) == doc
    with pytest.raises(ValueError, match="outside the SentencePiece vocabulary"):
        tok.detokenize([32000])


def test_spm_prefers_neox_endoftext_piece(brown: list[str], tmp_path: Path) -> None:
    """A model trained with an <|endoftext|> piece (as NeoX's are) ends documents with it."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for doc in brown for line in doc.splitlines() if line),
        model_writer=model,
        vocab_size=300,
        user_defined_symbols=["<|endoftext|>"],
        minloglevel=2,
    )
    path = tmp_path / "tiny.model"
    path.write_bytes(model.getvalue())
    tok = build_tokenizer("SPMTokenizer", path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert tok.eod == reference.piece_to_id("<|endoftext|>") != reference.eos_id()
    assert tok.vocab_size == 300


# --------------------------------------------------------------------------- TiktokenTokenizer


@pytest.fixture(scope="module")
def cl100k_reference(assets: Path) -> tiktoken.Encoding:
    """tiktoken's own cl100k_base definition, with its ranks read from the asset (the hash
    check inside tiktoken proves the file is OpenAI's) instead of downloaded."""
    from tiktoken import load
    from tiktoken_ext import openai_public

    ranks_file = str(assets / "tokenizers/cl100k_base.tiktoken")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache: read the file, write nothing
        patch.setattr(
            openai_public,
            "load_tiktoken_bpe",
            lambda url, expected_hash: load.load_tiktoken_bpe(ranks_file, expected_hash),
        )
        return tiktoken.Encoding(**openai_public.cl100k_base())


def test_tiktoken_cl100k_matches_tiktoken(
    assets: Path, cl100k_reference: tiktoken.Encoding, brown: list[str]
) -> None:
    tok = build_tokenizer("TiktokenTokenizer", assets / "tokenizers/cl100k_base.tiktoken")
    assert tok.tokenize("Hello world") == [9906, 1917]
    assert tok.vocab_size == cl100k_reference.n_vocab == 100277
    assert tok.eod == tok.pad == cl100k_reference.eot_token == 100257
    assert tok.tokenize("<|endoftext|>") == [100257]
    for doc in [*brown, TRICKY]:
        ids = tok.tokenize(doc)
        assert ids == cl100k_reference.encode(doc, allowed_special="all")
        assert tok.detokenize(ids) == doc
    with pytest.raises(ValueError, match="cannot decode token ids with cl100k_base"):
        tok.detokenize([100265])  # an unused id between the special tokens


def test_tiktoken_renamed_file_is_recognised(assets: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "tokenizer.tiktoken"
    renamed.symlink_to(assets / "tokenizers/cl100k_base.tiktoken")
    tok = build_tokenizer("TiktokenTokenizer", renamed)
    assert (tok.encoding, tok.eod) == ("cl100k_base", 100257)


def test_tiktoken_r50k_equals_gpt2(
    gpt2_files: tuple[Path, Path], gpt2: Tokenizer, brown: list[str], tmp_path: Path, monkeypatch
) -> None:
    """GPT-2's encoding in tiktoken's format (r50k_base) gives GPT-2's ids."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_files[1]), str(gpt2_files[0]))
    path = tmp_path / "r50k_base.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    tok = build_tokenizer("TiktokenTokenizer", path)
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    for doc in [*brown, TRICKY.replace("<|endoftext|>", "")]:
        assert tok.tokenize(doc) == gpt2.tokenize(doc)


def test_tiktoken_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=f"vocab_file {bad} line 2 is not a tiktoken rank"):
        build_tokenizer("TiktokenTokenizer", bad)
    unknown = tmp_path / "mine.tiktoken"
    unknown.write_bytes(b"YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match="cannot tell which tiktoken encoding its 2 ranks"):
        build_tokenizer("TiktokenTokenizer", unknown)


# --------------------------------------------------------------------------- CharLevelTokenizer


def test_char_level_neox_ids(brown: list[str]) -> None:
    tok = build_tokenizer("CharLevelTokenizer")
    assert (tok.vocab_size, tok.eod, tok.pad) == (512, 0, 1)
    assert tok.tokenize("Hello\n") == [ord(c) for c in "Hello\n"]
    # Past ASCII, NeoX's ids are the UTF-8 bytes.
    assert tok.tokenize("é🙂") == list("é🙂".encode())
    for doc in [*brown, TRICKY]:
        assert tok.detokenize(tok.tokenize(doc) + [tok.eod]) == doc
    assert tok.detokenize([104, 300, 105]) == "h\ufffdi"  # in the vocabulary, but no byte
    with pytest.raises(ValueError, match="outside the character vocabulary"):
        tok.detokenize([512])


# --------------------------------------------------------------------------- every type


def tokenizer_files(assets: Path) -> dict[str, tuple[Path | None, Path | None]]:
    tokenizers = assets / "tokenizers"
    gpt2 = (tokenizers / "gpt2-vocab.json", tokenizers / "gpt2-merges.txt")
    return {
        "GPT2BPETokenizer": gpt2,
        "HFGPT2Tokenizer": gpt2,
        "HFTokenizer": (tokenizers / "gpt-neox-20b-pii-special.json", None),
        "SPMTokenizer": (tokenizers / "mistral-7b-v0.1.model", None),
        "TiktokenTokenizer": (tokenizers / "cl100k_base.tiktoken", None),
        "CharLevelTokenizer": (None, None),
        "bytes": (None, None),
    }


@pytest.mark.parametrize(
    ("tokenizer_type", "divisible_by", "padded"),
    [
        ("GPT2BPETokenizer", 128, 50304),
        ("HFGPT2Tokenizer", 128, 50304),  # 50258 with <|padding|>
        ("HFTokenizer", 128, 50304),  # 50280
        ("SPMTokenizer", 128, 32000),
        ("SPMTokenizer", 384, 32256),
        ("TiktokenTokenizer", 128, 100352),  # 100277
        ("CharLevelTokenizer", 128, 512),
        ("CharLevelTokenizer", 100, 600),
        ("bytes", 128, 384),  # 257
    ],
)
def test_config_pads_each_tokenizers_vocab(
    assets: Path, tmp_path: Path, tokenizer_type: str, divisible_by: int, padded: int
) -> None:
    vocab, merges = tokenizer_files(assets)[tokenizer_type]
    dataset = write_dataset(tmp_path / "tiny_text_document", [[1, 2, 3, 4], [5, 6, 7]])
    values = small_config(
        dataset,
        tokenizer_type=tokenizer_type,
        make_vocab_size_divisible_by=divisible_by,
        **{k: str(v) for k, v in (("vocab_file", vocab), ("merge_file", merges)) if v},
    )
    assert NeoXArgs.from_dict(values).padded_vocab_size == padded


def test_config_accepts_an_hf_gpt2_directory(assets: Path, tmp_path: Path) -> None:
    vocab, merges = tokenizer_files(assets)["HFGPT2Tokenizer"]
    folder = tmp_path / "gpt2"
    folder.mkdir()
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    dataset = write_dataset(tmp_path / "tiny_text_document", [[1, 2, 3, 4], [5, 6, 7]])
    values = small_config(dataset, tokenizer_type="HFGPT2Tokenizer", vocab_file=str(folder))
    assert NeoXArgs.from_dict(values).padded_vocab_size == 50304


@pytest.mark.parametrize("tokenizer_type", ["HFGPT2Tokenizer", "SPMTokenizer", "TiktokenTokenizer"])
def test_missing_vocab_file_names_key_and_path(tmp_path: Path, tokenizer_type: str) -> None:
    missing = tmp_path / "missing.file"
    with pytest.raises(FileNotFoundError, match="vocab_file") as info:
        build_tokenizer(tokenizer_type, vocab_file=missing, merge_file=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match=f"tokenizer {tokenizer_type} needs vocab_file"):
        build_tokenizer(tokenizer_type)


@pytest.mark.parametrize("tokenizer_type", ["SPMTokenizer", "TiktokenTokenizer"])
def test_corrupt_vocab_file_is_a_config_error(tmp_path: Path, tokenizer_type: str) -> None:
    corrupt = tmp_path / "cl100k_base.tiktoken"
    corrupt.write_bytes(b"\x00\x01garbage\n")
    dataset = write_dataset(tmp_path / "tiny_text_document", [[1, 2, 3, 4], [5, 6, 7]])
    values = small_config(dataset, tokenizer_type=tokenizer_type, vocab_file=str(corrupt))
    with pytest.raises(ConfigError, match=f"tokenizer_type '{tokenizer_type}'.*{corrupt}"):
        NeoXArgs.from_dict(values)


def _word_level_tokenizer(folder: Path, tokens: list[str]) -> Path:
    """A tokenizer.json with exactly `tokens` (ids in order), as a training run exports it."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = HFBackend(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.pre_tokenizer = Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


LLAMA3_STYLE = ["<unk>", "hello", "world", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def test_hf_eod_comes_from_the_tokenizer_config(tmp_path: Path) -> None:
    """Llama-3 names its end of text <|end_of_text|>: not a fixed name, so the tokenizer's own
    configuration decides (tokenizer_config.json, else generation_config.json)."""
    path = _word_level_tokenizer(tmp_path / "llama3", LLAMA3_STYLE)
    with pytest.raises(ValueError, match="no end-of-document token.*tokenizer_config.json"):
        build_tokenizer("HFTokenizer", path)
    (path.parent / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 4]}))
    assert build_tokenizer("HFTokenizer", path).eod == 5
    config = {"eos_token": {"content": "<|end_of_text|>", "special": True}}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tok = build_tokenizer("HFTokenizer", path)
    assert tok.eod == tok.pad == 4 and tok.detokenize([tok.eod]) == "<|end_of_text|>"


def test_hf_eod_config_wins_over_known_names(tmp_path: Path) -> None:
    path = _word_level_tokenizer(tmp_path / "chat", ["<unk>", "<|endoftext|>", "<|im_end|>"])
    assert build_tokenizer("HFTokenizer", path).eod == 1  # no configuration: a known name
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert build_tokenizer("HFTokenizer", path).eod == 2
