"""GPT-NeoX / Megatron memory-mapped token datasets (`MMIDIDX` version 1), byte for byte.

A dataset is a pair of files sharing a prefix:

* `{prefix}.bin`: the tokens of every sequence, concatenated, in the dataset's dtype.
* `{prefix}.idx`, little-endian:
    magic       9 bytes  b"MMIDIDX\\x00\\x00"
    version     uint64   1
    dtype code  uint8    see DTYPES
    n           uint64   number of sequences
    n_doc_idx   uint64   length of doc_idx (documents + 1)
    sizes       int32[n]         tokens per sequence
    pointers    int64[n]         byte offset of each sequence in .bin
    doc_idx     int64[n_doc_idx] sequence index where each document starts, then the end
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from array import array

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# NeoX's dtype codes.
DTYPES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")


class DatasetError(ValueError):
    """A `.bin/.idx` pair that is missing, corrupt or unusable; the message names the file."""


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def dtype_code(dtype: np.dtype | type[np.generic]) -> int:
    """The `.idx` code of `dtype`."""
    dtype = np.dtype(dtype)
    for code, candidate in DTYPES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise ValueError(f"dtype {dtype} has no MMIDIDX code; supported: {list(DTYPES.values())}")


def best_dtype(vocab_size: int | None) -> type[np.generic]:
    """The smallest token dtype for `vocab_size` (NeoX's rule: uint16 below 65500)."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def _read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Validate `idx_path` and return (dtype, sizes, pointers, doc_idx) as memory-mapped views."""
    if not os.path.isfile(idx_path):
        raise DatasetError(f"index file not found: {idx_path}")
    file_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER.size)
    if not header.startswith(MAGIC) and not MAGIC.startswith(header):
        raise DatasetError(
            f"{idx_path} is not an MMIDIDX index: starts with {header[: len(MAGIC)]!r}, "
            f"expected {MAGIC!r} (only NeoX's mmap dataset_impl is supported)"
        )
    if len(header) < _HEADER.size:
        raise DatasetError(
            f"{idx_path} is truncated: {file_size} bytes, the header alone needs {_HEADER.size}"
        )
    _, version, code, n, n_doc_idx = _HEADER.unpack(header)
    if version != VERSION:
        raise DatasetError(f"{idx_path} has MMIDIDX version {version}; only {VERSION} is supported")
    if code not in DTYPES:
        raise DatasetError(f"{idx_path} has unknown dtype code {code}; known: {sorted(DTYPES)}")
    expected = _HEADER.size + 4 * n + 8 * n + 8 * n_doc_idx
    if file_size != expected:
        what = "truncated" if file_size < expected else "longer than its header says"
        raise DatasetError(
            f"{idx_path} is {what}: {file_size} bytes, expected {expected} "
            f"for {n} sequences and {n_doc_idx} doc_idx entries"
        )
    buffer = np.memmap(idx_path, mode="r", dtype=np.uint8)
    offset = _HEADER.size
    sizes = np.frombuffer(buffer, dtype="<i4", count=n, offset=offset)
    pointers = np.frombuffer(buffer, dtype="<i8", count=n, offset=offset + 4 * n)
    doc_idx = np.frombuffer(buffer, dtype="<i8", count=n_doc_idx, offset=offset + 12 * n)
    return np.dtype(DTYPES[code]), sizes, pointers, doc_idx


class MMapIndexedDataset:
    """Read-only view of `{path_prefix}.bin/.idx`; item i is sequence i as a NumPy array."""

    def __init__(self, path_prefix: str | os.PathLike[str]) -> None:
        self._open(os.fspath(path_prefix))

    def _open(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        self._dtype, self._sizes, self._pointers, self._doc_idx = _read_index(idx_path)
        if not os.path.isfile(bin_path):
            raise DatasetError(f"data file not found: {bin_path} (its index {idx_path} exists)")
        bin_size = os.path.getsize(bin_path)
        n = len(self._sizes)
        expected = 0 if n == 0 else int(self._pointers[-1]) + int(self._sizes[-1]) * self.itemsize
        if bin_size != expected:
            raise DatasetError(
                f"{bin_path} is {bin_size} bytes but {idx_path} describes {expected} "
                f"({n} sequences of {self._dtype}); the pair is truncated or mismatched"
            )
        # np.memmap cannot map an empty file.
        self._bin = (
            np.memmap(bin_path, mode="r", dtype=np.uint8)
            if bin_size
            else np.zeros(0, dtype=np.uint8)
        )

    # Workers get the prefix and map the files themselves instead of pickling the data.
    def __getstate__(self) -> str:
        return self.path_prefix

    def __setstate__(self, state: str) -> None:
        self._open(state)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def itemsize(self) -> int:
        return self._dtype.itemsize

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence (int32)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """Byte offset of each sequence in the `.bin` file (int64)."""
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """Sequence index where each document starts, followed by the end (int64)."""
        return self._doc_idx

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the `.bin` file as one memory-mapped array."""
        return np.frombuffer(self._bin, dtype=self._dtype)

    def __len__(self) -> int:
        return len(self._sizes)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.path_prefix} ({n} sequences)")
        return i % n

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `i` (to its end when length is None)."""
        i = self._check_index(int(i))
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                f"of {self.path_prefix} ({size} tokens)"
            )
        start = int(self._pointers[i]) + offset * self.itemsize
        return np.frombuffer(self._bin, dtype=self._dtype, count=length, offset=start)

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous (step 1)")
            return [self.get(i) for i in range(start, stop)]
        return self.get(index)


def check_doc_idx(dataset: MMapIndexedDataset) -> None:
    """Raise unless `dataset.doc_idx` rises from 0 to its number of sequences."""
    doc_idx, n = dataset.doc_idx, len(dataset)
    if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != n or np.any(np.diff(doc_idx) < 0):
        raise DatasetError(
            f"{index_file_path(dataset.path_prefix)}: doc_idx must rise from 0 to the number of "
            f"sequences ({n}), got {len(doc_idx)} entries "
            f"{doc_idx[:3].tolist()}...{doc_idx[-2:].tolist()}"
        )


class MMapIndexedDatasetBuilder:
    """Writes a `.bin/.idx` pair; both appear under their final names only in `finalize`.

    Use as a context manager (or call `abort`) so an error removes the temporary files.
    """

    def __init__(self, bin_path: str | os.PathLike[str], dtype: type[np.generic] = np.int32):
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._tmp_bin = _temp_path(self.bin_path)
        self._tmp_idx: str | None = None
        self._bin_file = open(self._tmp_bin, "xb")
        self.num_tokens = 0

    def add_item(self, tokens: np.ndarray | list[int]) -> None:
        """Append one sequence."""
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {values.shape}")
        if values.size and values.dtype != self.dtype:
            if values.dtype.kind in "iu" and self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                low, high = int(values.min()), int(values.max())
                if low < info.min or high > info.max:
                    raise ValueError(
                        f"token ids [{low}, {high}] do not fit {self.dtype} "
                        f"(range {info.min}..{info.max}) in {self.bin_path}"
                    )
            values = values.astype(self.dtype)
        self._bin_file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self._sizes.append(values.size)
        self.num_tokens += values.size

    def end_document(self) -> None:
        """Mark the sequences added since the last call as one document."""
        self._doc_idx.append(len(self._sizes))

    def add_dataset(self, dataset: MMapIndexedDataset, chunk_bytes: int = 1 << 24) -> None:
        """Append all of `dataset`'s sequences and documents; its `.bin` is copied in chunks."""
        source = data_file_path(dataset.path_prefix)
        if dataset.dtype != self.dtype:
            raise DatasetError(
                f"{source} holds {dataset.dtype} tokens but {self.bin_path} is {self.dtype}; "
                "datasets must share a dtype"
            )
        if self._doc_idx[-1] != len(self._sizes):
            raise ValueError("call end_document before add_dataset: a document is still open")
        sizes, doc_idx = dataset.sizes.astype(np.int64), dataset.doc_idx
        starts = np.zeros_like(sizes)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=starts[1:])
        if not np.array_equal(dataset.pointers, starts):
            raise DatasetError(f"{source}: sequences are not stored back to back; cannot copy it")
        check_doc_idx(dataset)
        self._doc_idx.frombytes((doc_idx[1:] + len(self._sizes)).astype(np.int64).tobytes())
        self._sizes.frombytes(sizes.tobytes())
        with open(source, "rb") as f:
            shutil.copyfileobj(f, self._bin_file, chunk_bytes)
        self.num_tokens += int(sizes.sum())

    def finalize(self, idx_path: str | os.PathLike[str]) -> None:
        """Write the index and move both files to their final names."""
        idx_path = os.fspath(idx_path)
        try:
            self._bin_file.close()
            sizes = np.frombuffer(self._sizes, dtype=np.int64)
            if sizes.size and sizes.max() > np.iinfo(np.int32).max:
                raise ValueError(f"a sequence in {self.bin_path} exceeds 2**31 - 1 tokens")
            pointers = np.zeros(len(sizes), dtype=np.int64)
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
            self._tmp_idx = _temp_path(idx_path)
            with open(self._tmp_idx, "xb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(self._doc_idx)))
                f.write(sizes.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(np.frombuffer(self._doc_idx, dtype=np.int64).astype("<i8").tobytes())
            # The index goes last: a reader that finds it can trust the data file beside it.
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, idx_path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are left untouched."""
        self._bin_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path is not None and os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def _temp_path(final_path: str) -> str:
    """A unique hidden name next to `final_path`, so the final rename stays on one filesystem."""
    directory, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
