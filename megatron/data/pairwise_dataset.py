"""One document per sample from aligned datasets: DPO pairs and KTO documents.

`dataset_impl: pairwise` (DPO) reads `pos_{split}_data_paths` / `neg_{split}_data_paths` (chosen
and rejected, document i of one paired with document i of the other) and optionally their
`*_label_data_paths`; item i -> {"pos", "neg", "pos_label", "neg_label"}.

`train_impl: kto` reads `{split}_data_paths`, optionally `{split}_label_data_paths`, and
`{split}_reward_data_paths` (one value per document, or one per token as GPT-NeoX writes them:
the document's reward is their sum; > 0 desirable, < 0 undesirable); item i ->
{"text", "label", "reward"}.

Token arrays are int64 [seq_length + 1]: a document is truncated to seq_length + 1 tokens (or
dropped when `allow_chopped` is false), then padded with token 0 and label -100. Without label
data every real token is a label. As GPT-NeoX does for unpacked data, documents whose first
sample holds no label (nothing to learn from) are dropped (the GPT2Dataset's label helpers);
KTO also drops reward-0 documents.

The index is megatron/data/sample_index.py's `unpacked` one (a permutation of the usable
documents per epoch, as many epochs as the requested samples need, samples shuffled).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron.data.gpt2_dataset import check_labels_match, labelled_documents
from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset
from megatron.data.sample_index import build_index

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
LABEL_PAD = -100
TOKEN_PAD = 0

Datasets = tuple[torch.utils.data.Dataset | None, ...]


@dataclass
class Source:
    """One output field: token data under `key`, its label data (if any) under `label_key`."""

    key: str
    tokens: MMapIndexedDataset
    label_key: str
    labels: MMapIndexedDataset | None = None


def document_rewards(rewards: MMapIndexedDataset, text: MMapIndexedDataset) -> np.ndarray:
    """Each document's reward: its single value, or the sum of its per-token values."""
    sizes, text_sizes = rewards.sizes.astype(np.int64), text.sizes.astype(np.int64)
    bad = np.flatnonzero(((sizes != 1) & (sizes != text_sizes)) | (sizes == 0))
    if len(bad):
        i = int(bad[0])
        raise DatasetError(
            f"reward document {i} of {rewards.path_prefix} holds {sizes[i]} values; expected 1 "
            f"(per document) or {text_sizes[i]} (one per token of {text.path_prefix})"
        )
    starts = rewards.pointers.astype(np.int64) // rewards.itemsize
    if not len(starts):
        return np.zeros(0)
    return np.add.reduceat(rewards.tokens, starts, dtype=np.float64)


def _check_aligned(name: str, first: MMapIndexedDataset, other: MMapIndexedDataset) -> None:
    if len(first) != len(other):
        raise DatasetError(
            f"{name}: {other.path_prefix} has {len(other)} documents but {first.path_prefix} has "
            f"{len(first)}; aligned datasets need the same number of documents"
        )


class AlignedDocumentDataset(torch.utils.data.Dataset):
    """Item i -> document `doc_idx[i]` of every source, padded to seq_length + 1 (+ "reward")."""

    def __init__(
        self,
        name: str,
        sources: Sequence[Source],
        num_samples: int,
        seq_length: int,
        seed: int,
        allow_chopped: bool = True,
        rewards: MMapIndexedDataset | None = None,
    ) -> None:
        self.name, self.sources, self.seq_length = name, list(sources), seq_length
        first = self.sources[0].tokens
        # A pair is as long as its longer side (allow_chopped drops pairs either side of which
        # overflows); `eligible` adds the label and reward rules.
        sizes = np.zeros(len(first), dtype=np.int64)
        eligible = np.ones(len(first), dtype=bool)
        for source in self.sources:
            _check_aligned(name, first, source.tokens)
            sizes = np.maximum(sizes, source.tokens.sizes)
            eligible &= source.tokens.sizes >= 2  # one input and one target at least
            if source.labels is not None:
                check_labels_match(source.tokens, source.labels)
                documents = np.arange(len(first))
                labelled = labelled_documents(source.labels, documents, seq_length + 1)
                eligible &= np.isin(documents, labelled)
        self.rewards = None
        if rewards is not None:
            _check_aligned(name, first, rewards)
            self.rewards = document_rewards(rewards, first).astype(np.float32)
            eligible &= self.rewards != 0
        prefixes = ", ".join(s.tokens.path_prefix for s in self.sources)
        if not eligible.any():
            raise DatasetError(
                f"{name}: none of the {len(first)} documents of {prefixes} is usable (each needs "
                f"2+ tokens and a label among its first {seq_length} targets"
                + (" and a non-zero reward" if rewards is not None else "")
                + ")"
            )
        try:
            index = build_index(
                sizes,
                num_samples,
                seq_length,
                seed,
                "unpacked",
                allow_chopped,
                np.flatnonzero(eligible),
            )
        except ValueError as err:
            raise DatasetError(f"{name} split of {prefixes}: {err}") from err
        # One document per sample: sample k is doc_idx[k]; served in shuffle_idx order.
        self.doc_idx = index.doc_idx[index.shuffle_idx]
        logger.info(
            "%s: %d of %d documents of %s usable, %d epochs",
            name,
            len(np.unique(index.doc_idx)),
            len(first),
            prefixes,
            index.num_epochs,
        )

    def __len__(self) -> int:
        return len(self.doc_idx)

    def _window(self, data: MMapIndexedDataset, doc: int, pad: int) -> np.ndarray:
        tokens = data.get(doc, 0, min(int(data.sizes[doc]), self.seq_length + 1))
        out = np.full(self.seq_length + 1, pad, dtype=np.int64)
        out[: len(tokens)] = tokens
        return out

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} ({len(self)} samples)")
        doc = int(self.doc_idx[idx])
        item = {}
        for source in self.sources:
            item[source.key] = self._window(source.tokens, doc, TOKEN_PAD)
            # Without label data every real token is a target.
            labels = source.tokens if source.labels is None else source.labels
            item[source.label_key] = self._window(labels, doc, LABEL_PAD)
        if self.rewards is not None:
            item["reward"] = np.float32(self.rewards[doc])
        return item


def split_path(args: Any, key: str) -> str | None:
    """The one dataset prefix under `key` (a list in NeoX configs), or None."""
    paths = getattr(args, key, None) or []
    if isinstance(paths, str):
        paths = [paths]
    if len(paths) > 1:
        raise ValueError(
            f"{key} lists {len(paths)} datasets; pairwise and KTO data take one path per split"
        )
    return paths[0] if paths else None


def _open(args: Any, key: str) -> MMapIndexedDataset | None:
    path = split_path(args, key)
    return None if path is None else MMapIndexedDataset(path)


def _build(args: Any, num_samples: Sequence[int], make) -> Datasets:
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    return tuple(make(split, n) if n > 0 else None for split, n in zip(SPLITS, num_samples))


def build_pairwise_datasets(args: Any, num_samples: Sequence[int]) -> Datasets:
    """(train, valid, test) DPO pair datasets from `pos_*` / `neg_*` paths; a split without
    paths (or without samples requested) is None."""

    def make(split: str, n: int) -> AlignedDocumentDataset | None:
        pos, neg = _open(args, f"pos_{split}_data_paths"), _open(args, f"neg_{split}_data_paths")
        if pos is None and neg is None:
            return None
        if pos is None or neg is None:
            missing = "pos" if pos is None else "neg"
            raise ValueError(f"{missing}_{split}_data_paths is required with dataset_impl pairwise")
        sources = [
            Source("pos", pos, "pos_label", _open(args, f"pos_{split}_label_data_paths")),
            Source("neg", neg, "neg_label", _open(args, f"neg_{split}_label_data_paths")),
        ]
        return AlignedDocumentDataset(
            split, sources, n, args.seq_length, args.seed, args.allow_chopped
        )

    return _build(args, num_samples, make)


def build_kto_datasets(args: Any, num_samples: Sequence[int]) -> Datasets:
    """(train, valid, test) KTO datasets: `{split}_data_paths` with their label and reward
    paths; a split without a data path (or without samples requested) is None."""

    def make(split: str, n: int) -> AlignedDocumentDataset | None:
        text = _open(args, f"{split}_data_paths")
        if text is None:
            return None
        rewards = _open(args, f"{split}_reward_data_paths")
        if rewards is None:
            raise ValueError(
                f"train_impl kto needs {split}_reward_data_paths for {text.path_prefix}"
            )
        source = Source("text", text, "label", _open(args, f"{split}_label_data_paths"))
        return AlignedDocumentDataset(
            split, [source], n, args.seq_length, args.seed, args.allow_chopped, rewards=rewards
        )

    return _build(args, num_samples, make)
