"""tools/datasets/merge_datasets.py and inspect_dataset.py, run as users run them."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _config_fixtures import write_dataset
from conftest import run_tool

from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import (
    DatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)
from tools.datasets.inspect_dataset import histogram_lines

pytestmark = pytest.mark.timeout(120)

MERGE = "tools/datasets/merge_datasets.py"
INSPECT = "tools/datasets/inspect_dataset.py"


def build(prefix: Path, documents: list[list[list[int]]], dtype: type = np.uint16) -> str:
    """A dataset whose documents may span several sequences (each a list of token lists)."""
    with MMapIndexedDatasetBuilder(data_file_path(str(prefix)), dtype) as builder:
        for document in documents:
            for sequence in document:
                builder.add_item(sequence)
            builder.end_document()
        builder.finalize(index_file_path(str(prefix)))
    return str(prefix)


def sequences(prefix: str) -> list[list[int]]:
    return [s.tolist() for s in MMapIndexedDataset(prefix)]


def leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


# --------------------------------------------------------------------------- merge


def test_merge_keeps_documents_and_doc_idx(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "in" / "a", [[1, 2, 3], [4], [5, 6]])
    # Documents of several sequences, and an empty sequence.
    b = build(tmp_path / "in" / "b", [[[7, 8], [9]], [[]], [[10, 11, 12]]])
    c = write_dataset(tmp_path / "in" / "c", [[60000, 13]])
    out = tmp_path / "out" / "merged"  # the folder does not exist yet
    result = run_tool(MERGE, "--input", a, b, c, "--output-prefix", str(out))
    assert "merged 3 datasets" in result.stdout
    assert "7 documents, 8 sequences, 14 tokens (uint16)" in result.stdout

    merged = MMapIndexedDataset(str(out))
    assert merged.dtype == np.uint16
    assert sequences(str(out)) == sequences(a) + sequences(b) + sequences(c)
    # a: 3 one-sequence documents; b: sequences (2, 1, 1) offset by 3; c: offset by 7.
    assert merged.doc_idx.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert leftovers(out.parent) == []


def test_merge_a_folder_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    second = write_dataset(folder / "part_1", [[3, 4]])
    first = write_dataset(folder / "part_0", [[1], [2]])
    out = str(tmp_path / "all")
    run_tool(MERGE, "--input", str(folder), "--output-prefix", out)
    assert sequences(out) == sequences(first) + sequences(second)
    assert MMapIndexedDataset(out).doc_idx.tolist() == [0, 1, 2, 3]


def test_add_dataset_copies_in_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 2**31 - 1, size=n).tolist() for n in (1000, 1, 333)]
    source = write_dataset(tmp_path / "src", docs, dtype=np.int32)
    out = str(tmp_path / "copy")
    with MMapIndexedDatasetBuilder(data_file_path(out), np.int32) as builder:
        builder.add_item([5, 6])
        builder.end_document()
        builder.add_dataset(MMapIndexedDataset(source), chunk_bytes=7)  # odd size on purpose
        builder.finalize(index_file_path(out))
    assert sequences(out) == [[5, 6], *docs]
    assert MMapIndexedDataset(out).doc_idx.tolist() == [0, 1, 2, 3, 4]


def test_add_dataset_rejects_an_open_document_and_a_bad_doc_idx(tmp_path: Path) -> None:
    good = write_dataset(tmp_path / "good", [[1, 2]])
    # Sequences never closed into a document: doc_idx is [0] for 2 sequences.
    unclosed = tmp_path / "unclosed"
    with MMapIndexedDatasetBuilder(data_file_path(str(unclosed)), np.uint16) as builder:
        builder.add_item([1])
        builder.add_item([2])
        builder.finalize(index_file_path(str(unclosed)))
    with MMapIndexedDatasetBuilder(data_file_path(str(tmp_path / "out")), np.uint16) as builder:
        with pytest.raises(DatasetError, match=f"{unclosed}.idx: doc_idx must rise from 0"):
            builder.add_dataset(MMapIndexedDataset(str(unclosed)))
        builder.add_item([3])
        with pytest.raises(ValueError, match="a document is still open"):
            builder.add_dataset(MMapIndexedDataset(good))
        builder.abort()
    assert leftovers(tmp_path) == []


def test_merge_dtype_mismatch_names_the_file(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", [[1, 2]])
    wide = write_dataset(tmp_path / "wide", [[3, 4]], dtype=np.int32)
    out = tmp_path / "out"
    result = run_tool(MERGE, "--input", a, wide, "--output-prefix", str(out), check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert f"{wide}.idx holds int32 tokens, but {a}.idx holds uint16" in result.stderr
    assert not Path(f"{out}.bin").exists() and not Path(f"{out}.idx").exists()
    assert leftovers(tmp_path) == []


def test_merge_bad_inputs(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", [[1, 2]])
    missing = str(tmp_path / "missing")
    result = run_tool(
        MERGE, "--input", a, missing, "--output-prefix", str(tmp_path / "o"), check=False
    )
    assert result.returncode == 1
    assert f"error: index file not found: {missing}.idx" in result.stderr
    result = run_tool(MERGE, "--input", a, "--output-prefix", a, check=False)
    assert result.returncode == 1
    assert f"--output-prefix {a} is also an input" in result.stderr
    assert sequences(a) == [[1, 2]]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_tool(
        MERGE, "--input", str(empty), "--output-prefix", str(tmp_path / "o"), check=False
    )
    assert result.returncode == 1
    assert f"input folder {empty} holds no .idx files" in result.stderr


# --------------------------------------------------------------------------- inspect


def field(output: str, name: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith(name + " "))
    return line[len(name) :].strip()


def test_inspect_summary_of_a_real_dataset(text_dataset: str) -> None:
    data = MMapIndexedDataset(text_dataset)
    out = run_tool(INSPECT, text_dataset).stdout
    assert field(out, "dtype") == "uint16"
    assert field(out, "documents") == str(len(data.doc_idx) - 1)
    assert field(out, "sequences").startswith(f"{len(data)} (doc_idx: {len(data.doc_idx)} ")
    assert field(out, "tokens") == str(int(data.sizes.sum()))
    # The histogram's counts add up to the documents, and its bins hold the right lengths.
    rows = [line for line in out.splitlines() if line.rstrip().endswith(tuple("0123456789"))]
    rows = [row for row in rows if "|" in row]
    counts = {int(row.split("-")[0]): int(row.rsplit("|", 1)[1]) for row in rows}
    assert sum(counts.values()) == len(data) > 1
    assert data.doc_idx.tolist() == list(range(len(data) + 1))  # one sequence per document
    lengths = data.sizes
    for low, count in counts.items():
        high = 2 * low - 1 if low else 0
        assert count == int(((lengths >= low) & (lengths <= high)).sum())


def test_inspect_decodes_a_document(text_dataset: str) -> None:
    corpus = Path(text_dataset).parent / "corpus.jsonl"
    texts = {json.loads(line)["text"] for line in corpus.read_text().splitlines()}
    out = run_tool(INSPECT, text_dataset, "--document", "2", "--tokenizer-type", "bytes").stdout
    header, _, text = out.partition("\n--- document 2: ")
    tokens, _, text = text.partition(" tokens ---\n")
    assert text[:-1] in texts  # print() added the final newline
    assert int(tokens) == MMapIndexedDataset(text_dataset).sizes[2]  # text bytes + the EOD


def test_inspect_prints_ids_without_a_tokenizer(tmp_path: Path) -> None:
    prefix = build(tmp_path / "d", [[[1, 2]], [[3], [4, 5]], [[6]]])
    out = run_tool(INSPECT, prefix, "--document", "1").stdout
    assert out.endswith("--- document 1: 3 tokens ---\n[3, 4, 5]\n")
    assert field(out, "documents") == "3" and field(out, "sequences").startswith("4 ")


def test_inspect_sample_is_gpt2_datasets(text_dataset: str) -> None:
    args = ["--sample", "5", "--seq-length", "64", "--seed", "7"]
    out = run_tool(INSPECT, text_dataset, *args).stdout
    _, _, ids = out.partition("--- sample 5 (seq_length 64, seed 7): 65 tokens ---\n")
    data = MMapIndexedDataset(text_dataset)
    dataset = GPT2Dataset("inspect", data, np.arange(len(data)), 6, 64, 7)
    assert ast.literal_eval(ids) == dataset[5]["text"].tolist()


def test_inspect_decodes_with_a_real_tokenizer(assets: Path, tmp_path: Path) -> None:
    prefix = write_dataset(tmp_path / "gpt2", [[15496, 995, 50256]])
    tokenizers = assets / "tokenizers"
    out = run_tool(
        INSPECT,
        prefix,
        "--document",
        "0",
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        str(tokenizers / "gpt2-vocab.json"),
        "--merge-file",
        str(tokenizers / "gpt2-merges.txt"),
    ).stdout
    assert out.endswith("---\nHello world<|endoftext|>\n")


def test_inspect_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = run_tool(INSPECT, str(missing), check=False)
    assert result.returncode == 1
    assert result.stderr == f"error: index file not found: {missing}.idx\n"
    prefix = write_dataset(tmp_path / "d", [[1, 2], [300]])
    result = run_tool(INSPECT, prefix, "--document", "2", check=False)
    assert result.returncode == 1
    assert "error: --document 2 is out of range: the dataset has 2" in result.stderr
    result = run_tool(INSPECT, prefix, "--document", "1", "--tokenizer-type", "bytes", check=False)
    assert result.returncode == 1
    assert "token ids [300] are outside bytes's vocabulary (size 257)" in result.stderr
    result = run_tool(INSPECT, prefix, "--sample", "0", check=False)
    assert result.returncode == 2
    assert "--sample needs --seq-length" in result.stderr


def test_histogram_bins() -> None:
    lines = histogram_lines(np.array([0, 1, 2, 3, 4, 7, 8, 8]))
    assert [line.split("|")[0].split() for line in lines] == [
        ["0", "-", "0"],
        ["1", "-", "1"],
        ["2", "-", "3"],
        ["4", "-", "7"],
        ["8", "-", "15"],
    ]
    assert [int(line.rsplit("|", 1)[1]) for line in lines] == [1, 1, 2, 2, 2]
    assert lines[2].count("#") == 40  # the largest bin fills the bar
    assert histogram_lines(np.array([], dtype=np.int64)) == ["(no documents)"]
    # Rows start at the shortest document; empty bins between are kept.
    rows = histogram_lines(np.array([5, 6, 40]))
    assert [row.split()[0] for row in rows] == ["4", "8", "16", "32"]
    assert [int(row.rsplit("|", 1)[1]) for row in rows] == [2, 0, 0, 1]
