"""MMIDIDX `.bin/.idx` files: byte layout, reading, atomic writing, and corruption errors."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    dtype_code,
)

pytestmark = pytest.mark.timeout(60)

SEQUENCES = [[1, 2, 3], [4, 5], [600]]


def build(prefix: Path, sequences=SEQUENCES, dtype=np.uint16, doc_ends=(2, 3)) -> None:
    """Write `sequences`, ending a document after each sequence count in `doc_ends`."""
    with MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype) as builder:
        for i, seq in enumerate(sequences, start=1):
            builder.add_item(np.array(seq))
            if i in doc_ends:
                builder.end_document()
        builder.finalize(f"{prefix}.idx")


def expected_idx(code: int, sizes: list[int], itemsize: int, doc_idx: list[int]) -> bytes:
    """The index written out field by field, as NeoX lays it out."""
    pointers = [sum(sizes[:i]) * itemsize for i in range(len(sizes))]
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", len(sizes))
        + struct.pack("<Q", len(doc_idx))
        + struct.pack(f"<{len(sizes)}i", *sizes)
        + struct.pack(f"<{len(sizes)}q", *pointers)
        + struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    )


@pytest.mark.parametrize(("dtype", "code", "fmt"), [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_files_match_the_byte_layout(tmp_path: Path, dtype, code: int, fmt: str) -> None:
    prefix = tmp_path / "ds"
    build(prefix, dtype=dtype)
    tokens = [t for seq in SEQUENCES for t in seq]
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack(f"<{len(tokens)}{fmt}", *tokens)
    itemsize = np.dtype(dtype).itemsize
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx(code, [3, 2, 1], itemsize, [0, 2, 3])


def test_read_back(tmp_path: Path) -> None:
    build(tmp_path / "ds")
    ds = MMapIndexedDataset(tmp_path / "ds")
    assert len(ds) == 3
    assert ds.dtype == np.uint16
    assert ds.sizes.tolist() == [3, 2, 1]
    assert ds.pointers.tolist() == [0, 6, 10]
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert [ds[i].tolist() for i in range(3)] == SEQUENCES
    assert ds[-1].tolist() == [600]
    assert [a.tolist() for a in ds[0:2]] == SEQUENCES[:2]
    assert ds.get(0, offset=1).tolist() == [2, 3]
    assert ds.get(0, offset=1, length=1).tolist() == [2]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get(1, offset=1, length=2)


def test_pickle_reopens_the_files(tmp_path: Path) -> None:
    build(tmp_path / "ds")
    ds = pickle.loads(pickle.dumps(MMapIndexedDataset(tmp_path / "ds")))
    assert ds[1].tolist() == [4, 5]
    assert len(pickle.dumps(ds)) < 1000  # the prefix, not the data


def test_empty_dataset(tmp_path: Path) -> None:
    build(tmp_path / "ds", sequences=[], doc_ends=())
    ds = MMapIndexedDataset(tmp_path / "ds")
    assert len(ds) == 0
    assert ds.doc_idx.tolist() == [0]


def test_best_dtype_and_codes() -> None:
    assert best_dtype(50257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(None) == np.int32
    assert [dtype_code(d) for d in (np.uint8, np.int8, np.int16, np.int32)] == [1, 2, 3, 4]
    assert [dtype_code(d) for d in (np.int64, np.float32, np.float64, np.uint16)] == [5, 6, 7, 8]


def test_nothing_under_final_names_until_finalize(tmp_path: Path) -> None:
    builder = MMapIndexedDatasetBuilder(tmp_path / "ds.bin", np.uint16)
    builder.add_item(np.array([1, 2]))
    builder.end_document()
    assert not (tmp_path / "ds.bin").exists()
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_error_inside_builder_context_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), MMapIndexedDatasetBuilder(tmp_path / "ds.bin") as builder:
        builder.add_item(np.array([1]))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_token_ids_must_fit_the_dtype(tmp_path: Path) -> None:
    with MMapIndexedDatasetBuilder(tmp_path / "ds.bin", np.uint16) as builder:
        with pytest.raises(ValueError, match="do not fit uint16"):
            builder.add_item(np.array([1, 70000]))
        builder.abort()


# --- corruption ------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    build(tmp_path / "ds")
    return tmp_path / "ds"


def test_wrong_magic(good: Path) -> None:
    idx = Path(f"{good}.idx")
    idx.write_bytes(b"TNTIDX\x00\x00" + idx.read_bytes()[8:])
    with pytest.raises(DatasetError, match="not an MMIDIDX index") as info:
        MMapIndexedDataset(good)
    assert str(idx) in str(info.value)


def test_unsupported_version(good: Path) -> None:
    idx = Path(f"{good}.idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:9] + struct.pack("<Q", 2) + data[17:])
    with pytest.raises(DatasetError, match="version 2"):
        MMapIndexedDataset(good)


def test_unknown_dtype_code(good: Path) -> None:
    idx = Path(f"{good}.idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:17] + bytes([9]) + data[18:])
    with pytest.raises(DatasetError, match="unknown dtype code 9"):
        MMapIndexedDataset(good)


@pytest.mark.parametrize("keep", [5, 20, -8])
def test_truncated_index(good: Path, keep: int) -> None:
    idx = Path(f"{good}.idx")
    idx.write_bytes(idx.read_bytes()[:keep])
    with pytest.raises(DatasetError, match="truncated") as info:
        MMapIndexedDataset(good)
    assert str(idx) in str(info.value)


@pytest.mark.parametrize("change", ["short", "long"])
def test_bin_size_mismatch(good: Path, change: str) -> None:
    data_file = Path(f"{good}.bin")
    data = data_file.read_bytes()
    data_file.write_bytes(data[:-2] if change == "short" else data + b"\x00\x00")
    with pytest.raises(DatasetError, match="is 10 bytes|is 14 bytes") as info:
        MMapIndexedDataset(good)
    assert str(data_file) in str(info.value)
    # Both sizes and both files are named.
    assert "describes 12" in str(info.value) and f"{good}.idx" in str(info.value)


def test_tokens_view_of_the_whole_file(good: Path) -> None:
    ds = MMapIndexedDataset(good)
    assert ds.tokens.tolist() == [t for seq in SEQUENCES for t in seq]
    assert ds.tokens.dtype == np.uint16


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_file(good: Path, suffix: str) -> None:
    os.remove(f"{good}{suffix}")
    with pytest.raises(DatasetError, match="not found") as info:
        MMapIndexedDataset(good)
    assert f"{good}{suffix}" in str(info.value)
