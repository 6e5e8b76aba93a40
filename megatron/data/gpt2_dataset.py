"""Packed language-model samples over an indexed dataset (GPT-NeoX's GPT2Dataset semantics).

The documents of a split are laid end to end, reshuffled every epoch, and cut into samples of
`seq_length + 1` tokens; each sample's last token is the next sample's first (the model predicts
tokens 1..seq_length from tokens 0..seq_length-1). Three int64 arrays describe this:

* doc_idx     [epochs * num_docs]      document order (each epoch a fresh permutation)
* sample_idx  [num_built + 1, 2]       (position in doc_idx, token offset) where each sample starts;
                                       sample i ends at row i + 1, inclusive
* shuffle_idx [num_built]              the order in which samples are served

All three are built with vectorised NumPy from the document sizes alone (`build_index`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset


class IndexArrays(NamedTuple):
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give `num_samples` samples (samples share one token)."""
    # Samples available after E epochs: (E * tokens_per_epoch - 1) // seq_length.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(num_docs: int, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Document order: one independent permutation of `range(num_docs)` per epoch."""
    if num_docs == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([rng.permutation(num_docs) for _ in range(num_epochs)]).astype(np.int64)


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Start (doc_idx position, offset) of every sample of the stream `sizes[doc_idx]`, plus the end.

    Sample i covers stream tokens [i * seq_length, (i + 1) * seq_length], so boundary i is the
    stream token i * seq_length, found by binary search in the cumulative document ends.
    """
    lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        raise ValueError("cannot cut samples from documents holding no tokens")
    num_built = (total - 1) // seq_length
    boundaries = np.arange(num_built + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents: a position belongs to the first document ending past it.
    position = np.searchsorted(ends, boundaries, side="right")
    offset = boundaries - (ends[position] - lengths[position])
    return np.stack([position, offset], axis=1).astype(np.int64)


def build_shuffle_idx(
    num_built: int, num_full_epoch_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Serving order: the samples of the complete epochs shuffled together, then the last epoch's.

    Keeping the last, partly used epoch apart means every sample of the earlier epochs is served
    exactly once before any sample of the last one (as Megatron-LM's separate_last_epoch does).
    """
    head = rng.permutation(num_full_epoch_samples)
    tail = num_full_epoch_samples + rng.permutation(num_built - num_full_epoch_samples)
    return np.concatenate([head, tail]).astype(np.int64)


def build_index(sizes: np.ndarray, num_samples: int, seq_length: int, seed: int) -> IndexArrays:
    """doc_idx, sample_idx and shuffle_idx for at least `num_samples` samples.

    `sizes` are the token counts of the documents in use; doc_idx holds positions in `sizes`.
    Raises ValueError when the documents hold fewer than `seq_length + 1` tokens.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if seq_length < 1:
        raise ValueError(f"seq_length must be at least 1, got {seq_length}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    tokens_per_epoch = int(sizes.sum())
    if tokens_per_epoch < seq_length + 1:
        raise ValueError(
            f"{len(sizes)} documents hold {tokens_per_epoch} tokens, fewer than one sample of "
            f"seq_length + 1 = {seq_length + 1}"
        )
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.default_rng(seed)
    doc_idx = build_doc_idx(len(sizes), num_epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length)
    num_built = len(sample_idx) - 1
    num_full_epoch_samples = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    shuffle_idx = build_shuffle_idx(num_built, max(0, num_full_epoch_samples), rng)
    return IndexArrays(doc_idx, sample_idx, shuffle_idx)


class GPT2Dataset(torch.utils.data.Dataset):
    """Item i -> {"text": int64 array of seq_length + 1 tokens}, served in shuffled order."""

    def __init__(
        self,
        name: str,
        indexed_dataset: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
    ) -> None:
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) and (documents.min() < 0 or documents.max() >= len(indexed_dataset)):
            raise ValueError(
                f"documents of {name} fall outside [0, {len(indexed_dataset)}) "
                f"for {indexed_dataset.path_prefix}"
            )
        try:
            index = build_index(indexed_dataset.sizes[documents], num_samples, seq_length, seed)
        except ValueError as err:
            raise DatasetError(
                f"{name} split of {indexed_dataset.path_prefix} is too small: {err}"
            ) from err
        # doc_idx addresses sequences of the indexed dataset directly from here on.
        self.doc_idx = documents[index.doc_idx]
        self.sample_idx = index.sample_idx
        self.shuffle_idx = index.shuffle_idx

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} ({len(self)} samples)")
        sample = int(self.shuffle_idx[idx])
        first, first_offset = (int(v) for v in self.sample_idx[sample])
        last, last_offset = (int(v) for v in self.sample_idx[sample + 1])
        data = self.indexed_dataset
        if first == last:
            tokens = data.get(self.doc_idx[first], first_offset, last_offset - first_offset + 1)
        else:
            pieces = [data.get(self.doc_idx[first], first_offset)]
            pieces += [data.get(self.doc_idx[k]) for k in range(first + 1, last)]
            pieces.append(data.get(self.doc_idx[last], 0, last_offset + 1))
            tokens = np.concatenate(pieces)
        return {"text": tokens.astype(np.int64)}
