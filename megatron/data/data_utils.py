"""Train/valid/test datasets from the config, and the data loader."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.samplers import PretrainingBatchSampler

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


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


def _single_path(args: Any, key: str) -> str | None:
    paths = getattr(args, key, None) or []
    if isinstance(paths, str):
        paths = [paths]
    if len(paths) > 1:
        raise ValueError(
            f"{key} lists {len(paths)} datasets; blending several datasets per split is not "
            "supported yet, give one path per split"
        )
    return paths[0] if paths else None


def build_train_valid_test_datasets(
    args: Any, num_samples: Sequence[int]
) -> tuple[GPT2Dataset | None, GPT2Dataset | None, GPT2Dataset | None]:
    """Datasets for (train, valid, test) serving at least `num_samples[i]` samples each.

    Reads `data_path` + `split`, or `train_data_paths`/`valid_data_paths`/`test_data_paths`
    (which win, as in NeoX), and `seq_length`, `seed`, `data_impl`. A split with no samples
    requested or no documents is None.
    """
    if getattr(args, "dataset_impl", "gpt2") == "pairwise":
        # DPO / reward-model data: chosen and rejected documents side by side.
        from megatron.data.pairwise_dataset import build_pairwise_datasets

        return build_pairwise_datasets(args, num_samples)
    data_impl = getattr(args, "data_impl", "mmap")
    if data_impl != "mmap":
        raise ValueError(f"data_impl {data_impl!r} is not supported; only 'mmap' is")
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")

    def make(
        name: str, data: MMapIndexedDataset, start: int, stop: int, n: int
    ) -> GPT2Dataset | None:
        if n <= 0 or stop <= start:
            return None
        documents = np.arange(start, stop, dtype=np.int64)
        logger.info("%s: documents [%d, %d) of %s", name, start, stop, data.path_prefix)
        return GPT2Dataset(name, data, documents, n, args.seq_length, args.seed)

    if getattr(args, "train_data_paths", None):
        datasets = []
        for name, n in zip(SPLIT_NAMES, num_samples):
            path = _single_path(args, f"{name}_data_paths")
            data = MMapIndexedDataset(path) if path and n > 0 else None
            datasets.append(make(name, data, 0, len(data), n) if data else None)
        return tuple(datasets)

    data_path = getattr(args, "data_path", None)
    if not data_path:
        raise ValueError("no training data: set data_path, or train_data_paths")
    data = MMapIndexedDataset(data_path)
    bounds = get_train_valid_test_split(getattr(args, "split", "969,30,1"), len(data))
    return tuple(
        make(name, data, bounds[i], bounds[i + 1], n)
        for i, (name, n) in enumerate(zip(SPLIT_NAMES, num_samples))
    )


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
