"""Language-model samples over an indexed dataset (GPT-NeoX's GPT2Dataset semantics).

The index (which documents, in which order, cut where, served when) comes from
`megatron.data.sample_index` and is cached on disk by `megatron.data.index_cache`. Items are
`{"text": int64[seq_length + 1]}`, plus `"label"` of the same shape when a label dataset (same
document sizes, -100 = no loss) is given. Samples shorter than `seq_length + 1` tokens (whole-
document `pack_impl`s) are padded as NeoX pads them: text with -100 when there are no labels
(the batch code masks negative targets and feeds padding as token 0), else text with 0 and labels
with -100.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron.data import index_cache
from megatron.data.indexed_dataset import (
    DatasetError,
    MMapIndexedDataset,
    data_file_path,
    index_file_path,
)
from megatron.data.sample_index import DOCUMENTWISE, IndexArrays, build_index, validate

# Tokens of the label .bin file examined per step when looking for documents with labels.
_LABEL_CHUNK_TOKENS = 1 << 24
IGNORE_INDEX = -100


def dataset_files(*datasets: MMapIndexedDataset | None) -> list[str]:
    """The files an index over these datasets depends on."""
    files = []
    for data in datasets:
        if data is not None:
            files += [index_file_path(data.path_prefix), data_file_path(data.path_prefix)]
    return files


def check_labels_match(text: MMapIndexedDataset, label: MMapIndexedDataset) -> None:
    """Labels must be aligned with their text token for token."""
    if len(text) != len(label) or not np.array_equal(text.sizes, label.sizes):
        mismatch = np.flatnonzero(text.sizes[: len(label)] != label.sizes[: len(text)])
        where = (
            f"sequence {int(mismatch[0])} holds {int(text.sizes[mismatch[0]])} tokens vs "
            f"{int(label.sizes[mismatch[0]])}"
            if len(mismatch)
            else f"{len(text)} vs {len(label)} sequences"
        )
        raise DatasetError(
            f"label dataset {label.path_prefix} does not match {text.path_prefix}: {where}; "
            "labels need the same sequences and lengths as their text"
        )


def labelled_documents(label: MMapIndexedDataset, documents: np.ndarray, limit: int) -> np.ndarray:
    """Positions in `documents` with at least one label >= 0 among their first `limit` tokens.

    Reads the label file in chunks of about 16M tokens: a running count of non-negative labels
    gives each document's count as a difference of two entries.
    """
    documents = np.asarray(documents, dtype=np.int64)
    if label.dtype.kind == "u":
        return np.arange(len(documents))
    tokens = label.tokens
    starts = label.pointers[documents] // label.itemsize
    lengths = np.minimum(label.sizes[documents].astype(np.int64), limit)
    order = np.argsort(starts, kind="stable")
    sorted_starts = starts[order]
    keep = np.zeros(len(documents), dtype=bool)
    first = 0
    while first < len(order):
        base = int(sorted_starts[first])
        last = max(first + 1, int(np.searchsorted(sorted_starts, base + _LABEL_CHUNK_TOKENS)))
        chunk = order[first:last]
        local = starts[chunk] - base
        stop = int((local + lengths[chunk]).max())
        counts = np.zeros(stop + 1, dtype=np.int64)
        np.cumsum(tokens[base : base + stop] >= 0, out=counts[1:])
        keep[chunk] = counts[local + lengths[chunk]] > counts[local]
        first = last
    return np.flatnonzero(keep)


def _pad(values: np.ndarray, length: int, fill: int) -> np.ndarray:
    out = np.full(length, fill, dtype=np.int64)
    out[: len(values)] = values
    return out


class GPT2Dataset(torch.utils.data.Dataset):
    """Item i -> {"text": int64 array of seq_length + 1 tokens} (+ "label"), in shuffled order.

    `documents` are the sequence indices of `indexed_dataset` this dataset draws from (a split);
    at least `num_samples` samples are available (whole epochs are built, so usually more).
    """

    def __init__(
        self,
        name: str,
        indexed_dataset: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        *,
        pack_impl: str = "packed",
        allow_chopped: bool = True,
        label_dataset: MMapIndexedDataset | None = None,
        shared_fs: bool = True,
    ) -> None:
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.label_dataset = label_dataset
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.pack_impl = pack_impl
        self.allow_chopped = allow_chopped
        prefix = indexed_dataset.path_prefix
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) and (documents.min() < 0 or documents.max() >= len(indexed_dataset)):
            raise ValueError(
                f"documents of {name} fall outside [0, {len(indexed_dataset)}) for {prefix}"
            )
        if label_dataset is not None:
            check_labels_match(indexed_dataset, label_dataset)
        sizes = indexed_dataset.sizes[documents].astype(np.int64)
        try:
            # Cheap, on every process: none may wait for a build that was bound to fail.
            validate(sizes, seq_length, pack_impl, allow_chopped)
        except ValueError as err:
            raise DatasetError(f"{name} split of {prefix} is too small: {err}") from err

        def build() -> IndexArrays:
            eligible = None
            if label_dataset is not None and pack_impl in DOCUMENTWISE:
                eligible = labelled_documents(label_dataset, documents, seq_length + 1)
            try:
                index = build_index(
                    sizes, num_samples, seq_length, seed, pack_impl, allow_chopped, eligible
                )
            except ValueError as err:
                raise DatasetError(f"{name} split of {prefix}: {err}") from err
            # From here on doc_idx holds sequence indices of the indexed dataset.
            return index._replace(doc_idx=documents[index.doc_idx])

        key = index_cache.cache_key(
            dataset_files(indexed_dataset, label_dataset),
            documents,
            num_samples=num_samples,
            seq_length=seq_length,
            seed=seed,
            pack_impl=pack_impl,
            allow_chopped=allow_chopped,
        )
        stem = (
            f"{os.path.basename(prefix)}_{name}_indexmap_{num_samples}ns_{seq_length}sl_"
            f"{seed}s_{pack_impl}_{key}"
        )
        directories = [os.path.dirname(os.path.abspath(prefix)), index_cache.fallback_dir()]
        index = index_cache.load_or_build(
            index_cache.IndexCache(directories, stem), build, shared_fs
        )
        self.index = index
        self.doc_idx, self.sample_idx, self.shuffle_idx, self.epoch_ends = index

    @property
    def num_epochs(self) -> int:
        return self.index.num_epochs

    @property
    def samples_per_epoch(self) -> int:
        return self.index.samples_per_epoch

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def _packed(self, data: MMapIndexedDataset, sample: int) -> np.ndarray:
        first, first_offset = (int(v) for v in self.sample_idx[sample])
        last, last_offset = (int(v) for v in self.sample_idx[sample + 1])
        if first == last:
            return data.get(self.doc_idx[first], first_offset, last_offset - first_offset + 1)
        pieces = [data.get(self.doc_idx[first], first_offset)]
        pieces += [data.get(self.doc_idx[k]) for k in range(first + 1, last)]
        pieces.append(data.get(self.doc_idx[last], 0, last_offset + 1))
        return np.concatenate(pieces)

    def _documents(self, data: MMapIndexedDataset, sample: int) -> np.ndarray:
        first, last = int(self.sample_idx[sample, 0]), int(self.sample_idx[sample + 1, 0])
        limit = self.seq_length + 1
        pieces = []
        for position in range(first, last):
            doc = int(self.doc_idx[position])
            pieces.append(data.get(doc, 0, min(int(data.sizes[doc]), limit)))
        return np.concatenate(pieces)[:limit]

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} ({len(self)} samples)")
        sample = int(self.shuffle_idx[idx])
        read = self._documents if self.pack_impl in DOCUMENTWISE else self._packed
        length = self.seq_length + 1
        text = read(self.indexed_dataset, sample)
        if self.label_dataset is None:
            return {"text": _pad(text, length, IGNORE_INDEX)}
        label = read(self.label_dataset, sample)
        return {"text": _pad(text, length, 0), "label": _pad(label, length, IGNORE_INDEX)}
