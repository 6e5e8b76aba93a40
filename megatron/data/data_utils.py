"""Train/valid/test datasets from the config (splits, blends, labels), epochs, and the loader."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.blendable_dataset import (
    BlendableDataset,
    mixture_table,
    normalize_weights,
    samples_drawn,
    weights_by_num_documents,
)
from megatron.data.gpt2_dataset import GPT2Dataset, labelled_documents
from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset
from megatron.data.sample_index import DOCUMENTWISE, epoch_samples
from megatron.data.samplers import PretrainingBatchSampler
from megatron.neox_arguments.rules import register_reader

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
Dataset = GPT2Dataset | BlendableDataset


def get_train_valid_test_split(split: str, num_docs: int) -> list[int]:
    """Document boundaries [0, train_end, valid_end, num_docs] for a NeoX split string.

    `split` is weights separated by "," or "/" ("969,30,1"); missing weights are 0. Each range
    gets round(weight / total * num_docs) documents; the train range absorbs the rounding error,
    as in NeoX.
    """
    split = str(split)
    separator = "," if "," in split else "/"
    try:
        weights = [float(part) for part in split.split(separator)]
    except ValueError as err:
        raise ValueError(f"split must be numbers like '969,30,1', got {split!r}") from err
    weights = (weights + [0.0, 0.0])[:3]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split weights must be non-negative with a positive sum, got {split!r}")
    total = sum(weights)
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + int(round(weight / total * num_docs)))
    excess = bounds[-1] - num_docs
    return [0] + [max(0, b - excess) for b in bounds[1:]]


def _paths(args: Any, key: str) -> list[str]:
    paths = getattr(args, key, None) or []
    return [paths] if isinstance(paths, str) else list(paths)


def _open_labels(args: Any, key: str, count: int) -> list[MMapIndexedDataset | None]:
    paths = _paths(args, key)
    if paths and len(paths) != count:
        raise ValueError(f"{key} lists {len(paths)} datasets but there are {count} data paths")
    return [MMapIndexedDataset(p) for p in paths] if paths else [None] * count


def _gpt2(
    args: Any,
    name: str,
    data: MMapIndexedDataset,
    documents: np.ndarray,
    num_samples: int,
    label: MMapIndexedDataset | None,
) -> GPT2Dataset:
    logger.info("%s: %d documents of %s", name, len(documents), data.path_prefix)
    return GPT2Dataset(
        name,
        data,
        documents,
        num_samples,
        args.seq_length,
        args.seed,
        pack_impl=getattr(args, "pack_impl", "packed"),
        allow_chopped=getattr(args, "allow_chopped", True),
        label_dataset=label,
        shared_fs=getattr(args, "use_shared_fs", True),
    )


def split_weights(args: Any, split: str, datasets: Sequence[MMapIndexedDataset]) -> np.ndarray:
    """The normalised blending weights of a split: `{split}_data_weights` (default equal), or
    NeoX's document-count weights with `weight_by_num_documents`."""
    if getattr(args, "weight_by_num_documents", False):
        alpha = getattr(args, "weighted_sampler_alpha", 1.0)
        return weights_by_num_documents([len(d) for d in datasets], alpha)
    key = f"{split}_data_weights"
    weights = getattr(args, key, None) or [1.0] * len(datasets)
    if len(weights) != len(datasets):
        raise ValueError(
            f"{key} has {len(weights)} entries but {split}_data_paths has {len(datasets)}"
        )
    return normalize_weights(weights, key)


def _build_split(args: Any, split: str, num_samples: int) -> Dataset | None:
    """One split from `{split}_data_paths`: a dataset, or a blend of several."""
    paths = _paths(args, f"{split}_data_paths")
    if num_samples <= 0 or not paths:
        return None
    datas = [MMapIndexedDataset(p) for p in paths]
    labels = _open_labels(args, f"{split}_label_data_paths", len(datas))
    if len(datas) == 1:
        return _gpt2(args, split, datas[0], np.arange(len(datas[0])), num_samples, labels[0])
    weights = split_weights(args, split, datas)
    drawn = samples_drawn(weights, num_samples)
    members = [
        _gpt2(args, f"{split}_{i}", data, np.arange(len(data)), int(n), label) if n else None
        for i, (data, label, n) in enumerate(zip(datas, labels, drawn))
    ]
    return BlendableDataset(members, weights, num_samples, labels=paths)


def build_train_valid_test_datasets(
    args: Any, num_samples: Sequence[int]
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Datasets for (train, valid, test) serving at least `num_samples[i]` samples each.

    Reads `data_path` + `split` (+ `label_data_paths`), or `{split}_data_paths` with
    `{split}_data_weights` / `weight_by_num_documents` and `{split}_label_data_paths` (which win,
    as in NeoX), and `seq_length`, `seed`, `pack_impl`, `allow_chopped`, `data_impl`. A split
    with no samples requested or no documents is None.
    """
    if getattr(args, "dataset_impl", "gpt2") == "pairwise":
        # DPO / reward-model data: chosen and rejected documents side by side.
        from megatron.data.pairwise_dataset import build_pairwise_datasets

        return build_pairwise_datasets(args, num_samples)
    if getattr(args, "train_impl", "normal") == "kto":
        # KTO: one document per sample with its reward.
        from megatron.data.pairwise_dataset import build_kto_datasets

        return build_kto_datasets(args, num_samples)
    data_impl = getattr(args, "data_impl", "mmap")
    if data_impl != "mmap":
        raise ValueError(f"data_impl {data_impl!r} is not supported; only 'mmap' is")
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")

    if getattr(args, "train_data_paths", None):
        return tuple(_build_split(args, s, n) for s, n in zip(SPLIT_NAMES, num_samples))

    data, label, bounds = _split_data_path(args)
    datasets = []
    for i, (name, n) in enumerate(zip(SPLIT_NAMES, num_samples)):
        documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
        datasets.append(
            _gpt2(args, name, data, documents, n, label) if n and len(documents) else None
        )
    return tuple(datasets)


def _split_data_path(args: Any) -> tuple[MMapIndexedDataset, MMapIndexedDataset | None, list]:
    """`data_path`'s dataset, its labels (or None) and the document bounds `split` gives."""
    data_path = getattr(args, "data_path", None)
    if not data_path:
        raise ValueError("no training data: set data_path, or train_data_paths")
    data = MMapIndexedDataset(data_path)
    (label,) = _open_labels(args, "label_data_paths", 1)
    return data, label, get_train_valid_test_split(getattr(args, "split", "969,30,1"), len(data))


def describe_dataset(split: str, dataset: Dataset | None) -> str:
    """What a split serves: its mixture for a blend, else its size in samples and epochs."""
    if isinstance(dataset, BlendableDataset):
        per_epoch = [None if d is None else d.samples_per_epoch for d in dataset.datasets]
        return mixture_table(split, dataset.labels, dataset.weights, dataset.drawn, per_epoch)
    if dataset is None:
        return f"{split} data: none"
    if not isinstance(dataset, GPT2Dataset):
        return f"{split} data: {len(dataset):,} samples ({type(dataset).__name__})"
    return (
        f"{split} data: {dataset.indexed_dataset.path_prefix}: {dataset.num_samples:,} samples "
        f"= {dataset.num_samples / dataset.samples_per_epoch:.3f} epochs of "
        f"{dataset.samples_per_epoch:,} ({dataset.pack_impl})"
    )


# --- train_epochs ----------------------------------------------------------------------------


def train_epoch_samples(args: Any, num_epochs: int) -> tuple[int, int]:
    """(samples in one epoch, samples in `num_epochs` epochs) of the training data, as the
    training index cuts them."""
    paths = _paths(args, "train_data_paths")
    if len(paths) > 1:
        raise ValueError(
            f"train_epochs needs one training dataset; train_data_paths lists {len(paths)} "
            "(a blend has no single epoch): set train_iters"
        )
    if paths:
        data = MMapIndexedDataset(paths[0])
        (label,) = _open_labels(args, "train_label_data_paths", 1)
        documents = np.arange(len(data), dtype=np.int64)
    else:
        data, label, bounds = _split_data_path(args)
        documents = np.arange(bounds[0], bounds[1], dtype=np.int64)
    pack_impl = getattr(args, "pack_impl", "packed")
    options = dict(pack_impl=pack_impl, allow_chopped=getattr(args, "allow_chopped", True))
    if label is not None and pack_impl in DOCUMENTWISE:
        options["eligible"] = labelled_documents(label, documents, args.seq_length + 1)
    sizes = data.sizes[documents]
    try:
        return tuple(
            epoch_samples(sizes, args.seq_length, args.seed, num_epochs=n, **options)
            for n in (1, num_epochs)
        )
    except ValueError as err:
        raise DatasetError(f"train split of {data.path_prefix} is too small: {err}") from err


def train_iters_for_epochs(args: Any) -> tuple[int, int, int]:
    """(train_iters, samples per epoch, samples in train_epochs epochs) for `train_epochs`: the
    most whole optimizer steps whose samples fit in train_epochs passes over the training data
    (so no sample is seen more than train_epochs times)."""
    per_epoch, total = train_epoch_samples(args, args.train_epochs)
    iters = total // args.train_batch_size
    if iters < 1:
        raise DatasetError(
            f"train_epochs={args.train_epochs}: the training data gives {total} samples, fewer "
            f"than one batch of train_batch_size={args.train_batch_size}"
        )
    return iters, per_epoch, total


# The config derives train_iters from train_epochs with it while it is built.
register_reader("train_iters_for_epochs", train_iters_for_epochs)


def make_data_loader(
    dataset: torch.utils.data.Dataset | None,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int,
) -> torch.utils.data.DataLoader | None:
    """A loader yielding {"text": LongTensor[micro_batch_size, seq_length + 1]} for one DP rank."""
    if dataset is None:
        return None
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout would differ from the uninterrupted run's.
        generator=torch.Generator(),
    )
