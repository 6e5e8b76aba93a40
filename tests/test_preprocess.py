"""preprocess_data, train_tokenizer and stdlib_corpus, run in-process through their main()."""

from __future__ import annotations

import gzip
import json
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer import build_tokenizer
from tools import train_tokenizer
from tools.datasets import preprocess_data, stdlib_corpus


@pytest.fixture
def brown(assets: Path, tmp_path: Path) -> Path:
    """The first 40 Brown documents: real text, small enough to stay fast."""
    path = tmp_path / "in" / "brown.jsonl"
    path.parent.mkdir()
    with open(assets / "corpora/brown.jsonl", "rb") as src:
        path.write_bytes(b"".join(islice(src, 40)))
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_bytes(inputs: str, prefix: Path, *extra: str) -> int:
    argv = ["--input", inputs, "--output-prefix", str(prefix), "--tokenizer-type", "bytes"]
    return preprocess_data.main([*argv, *extra])


@pytest.mark.parametrize("workers", [1, 2])
def test_gpt2_ids_per_document(assets: Path, brown: Path, tmp_path: Path, workers: int) -> None:
    vocab, merges = assets / "tokenizers/gpt2-vocab.json", assets / "tokenizers/gpt2-merges.txt"
    prefix = tmp_path / "out" / "brown"
    argv = ["--input", str(brown), "--output-prefix", str(prefix)]
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab)]
    argv += ["--merge-file", str(merges), "--append-eod", "--workers", str(workers)]
    assert preprocess_data.main(argv) == 0

    tok = build_tokenizer("GPT2BPETokenizer", vocab, merges)
    texts = [json.loads(line)["text"] for line in brown.read_text().splitlines()]
    ds = MMapIndexedDataset(f"{prefix}_text_document")
    assert ds.dtype == np.uint16
    assert len(ds) == len(texts) == 40
    assert ds.doc_idx.tolist() == list(range(41))
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    assert sorted(os.listdir(prefix.parent)) == [
        "brown_text_document.bin",
        "brown_text_document.idx",
    ]


def test_workers_give_identical_files(tmp_path: Path) -> None:
    records = [{"text": f"document {i} " * (i % 7 + 1)} for i in range(300)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    assert run_bytes(str(path), tmp_path / "one", "--workers", "1") == 0
    assert run_bytes(str(path), tmp_path / "two", "--workers", "2") == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"two_text_document{suffix}").read_bytes()


def test_keys_gzip_and_empty_documents(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = [
        {"text": "ab", "title": "T1"},
        {"text": "", "title": "T2"},
        {"text": "cde", "title": ""},
    ]
    plain = write_jsonl(tmp_path / "a.jsonl", records[:2])
    packed = tmp_path / "b.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps(records[2]) + "\n\n")  # a blank line is not a document
    inputs = f"{plain},{packed}"
    assert run_bytes(inputs, tmp_path / "out", "--jsonl-keys", "text", "title", "--append-eod") == 0

    text = MMapIndexedDataset(tmp_path / "out_text_document")
    assert [a.tolist() for a in text[:]] == [[97, 98, 256], [99, 100, 101, 256]]
    title = MMapIndexedDataset(tmp_path / "out_title_document")
    assert [a.tolist() for a in title[:]] == [[84, 49, 256], [84, 50, 256]]
    report = capsys.readouterr().out
    assert "read 3 documents" in report
    assert "text: 2 documents, 7 tokens" in report and "(1 empty documents skipped)" in report


@pytest.mark.parametrize(
    ("bad_line", "message", "workers"),
    [
        ("{not json", "not valid JSON", "1"),
        ('{"body": "x"}', "missing key 'text'", "1"),
        ('{"text": 3}', "must be a string", "1"),
        ("[1]", "expected a JSON object", "1"),
        ("{not json", "not valid JSON", "2"),  # raised in a worker process
    ],
)
def test_bad_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, workers: str, bad_line: str, message: str
) -> None:
    path = tmp_path / "in" / "bad.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + bad_line + "\n")
    out = tmp_path / "out"
    out.mkdir()
    assert run_bytes(str(path), out / "ds", "--workers", workers) == 1
    error = capsys.readouterr().err
    assert f"{path}:3" in error and message in error
    assert os.listdir(out) == []


def test_unsupported_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "in.txt"
    path.write_text("hello")
    assert run_bytes(str(path), tmp_path / "ds") == 1
    assert ".jsonl or .jsonl.gz" in capsys.readouterr().err
    assert run_bytes(str(tmp_path / "missing.jsonl"), tmp_path / "ds") == 1
    assert "not found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_trained_tokenizer_round_trips(tmp_path: Path) -> None:
    sentences = [
        f"Sentence number {i} talks about {word} and the tokenizer that reads it.\n"
        for i, word in enumerate(["data", "models", "training", "évaluation", "数据"] * 40)
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": s} for s in sentences])
    output = tmp_path / "tok" / "tokenizer.json"
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output", str(output)]
    assert train_tokenizer.main(argv) == 0
    assert sorted(os.listdir(output.parent)) == ["tokenizer.json"]

    tok = build_tokenizer("HFTokenizer", vocab_file=output)
    assert 258 < tok.vocab_size <= 400  # a small corpus may run out of merges before 400
    assert (tok.eod, tok.pad) == (0, 1)
    for text in [sentences[3], "unseen: ünïcödé 🙂\n\ttabs  and  spaces "]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert len(tok.tokenize(sentences[3])) < len(sentences[3])  # merges were learned


def test_train_tokenizer_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    output = tmp_path / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(corpus), "--output", str(output)]) == 1
    assert f"{corpus}:2" in capsys.readouterr().err
    assert not output.exists()


def test_stdlib_corpus(tmp_path: Path) -> None:
    output = tmp_path / "stdlib.jsonl"
    assert stdlib_corpus.main(["--output", str(output), "--max-bytes", "300000"]) == 0
    data = output.read_bytes()
    assert 0 < len(data) <= 300_000
    texts = [json.loads(line)["text"] for line in data.decode().splitlines()]
    assert len(texts) > 1 and all(t.strip() for t in texts)
    assert any("def " in t for t in texts)
    again = tmp_path / "again.jsonl"
    assert stdlib_corpus.main(["--output", str(again), "--max-bytes", "300000"]) == 0
    assert again.read_bytes() == data  # deterministic order


def test_stdlib_corpus_skips_tests_and_sorts(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for rel, text in [
        ("b.py", "B = 1\n"),
        ("a/z.py", "Z = 1\n"),
        ("test/t.py", "T = 1\n"),
        ("site-packages/s.py", "S = 1\n"),
        ("empty.py", ""),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    output = tmp_path / "out.jsonl"
    assert stdlib_corpus.main(["--output", str(output), "--stdlib-dir", str(root)]) == 0
    texts = [json.loads(line)["text"] for line in output.read_text().splitlines()]
    assert texts == ["Z = 1\n", "B = 1\n"]
