"""Blending several datasets by weight (GPT-NeoX's BlendableDataset), vectorised in NumPy.

NeoX's C++ helper interleaves greedily: sample t goes to the dataset furthest behind its share
(weight * t - samples drawn so far). Here the k-th sample of dataset i is given the key
(k + 1/2) / weight_i and samples are served by increasing key (ties: lower dataset index), i.e.
the Sainte-Laguë order. It has the property the greedy loop is for: every prefix of t samples
holds about weight_i * t samples of dataset i (within 1 + n/2 for n datasets), and it is one sort
instead of a loop over samples. The order depends only on the weights and the length, never on
the data-parallel size, so resuming with another layout continues at the same global sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def normalize_weights(weights: Sequence[float], what: str = "weights") -> np.ndarray:
    values = np.asarray(weights, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"{what} must be a non-empty list of numbers, got {list(weights)!r}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise ValueError(
            f"{what} must be non-negative numbers with a positive sum, got {list(weights)!r}"
        )
    return values / values.sum()


def weights_by_num_documents(num_documents: Sequence[int], alpha: float) -> np.ndarray:
    """NeoX's `weight_by_num_documents` weights.

    With p_i = n_i / sum(n) the share of documents, q_i = p_i ** alpha (normalised) and the weight
    q_i * (1 - p_i) (normalised): alpha < 1 boosts small datasets (alpha = 0 samples all
    groups alike before the (1 - p) factor; see arXiv:1911.02116). One dataset gets weight 1.
    """
    counts = np.asarray(num_documents, dtype=np.float64)
    if len(counts) == 1:
        return np.ones(1)
    if counts.sum() <= 0:
        raise ValueError(f"weight_by_num_documents: the datasets hold no documents ({counts})")
    shares = counts / counts.sum()
    boosted = shares**alpha
    boosted /= boosted.sum()
    return normalize_weights(boosted * (1.0 - shares), "weight_by_num_documents weights")


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index), each int64[size]: sample t of the blend is sample
    dataset_sample_index[t] of dataset dataset_index[t]."""
    weights = normalize_weights(weights)
    keys, owners, offsets = [], [], np.zeros(len(weights), dtype=np.int64)
    slack = len(weights) / 2 + 2  # a prefix may run ahead of its share by up to 1 + n / 2
    for i, weight in enumerate(weights):
        if weight == 0:
            continue
        count = min(size, int(np.ceil(weight * (size + slack))) + 2)
        offsets[i] = sum(len(k) for k in keys)
        keys.append((np.arange(count, dtype=np.float64) + 0.5) / weight)
        owners.append(np.full(count, i, dtype=np.int64))
    all_keys = np.concatenate(keys)
    all_owners = np.concatenate(owners)
    # A stable sort of keys listed dataset by dataset breaks ties by the lower dataset index.
    order = np.argsort(all_keys, kind="stable")[:size]
    dataset_index = all_owners[order]
    # Keys of one dataset are increasing, so its samples come out in order 0, 1, 2, ...: the
    # sample number is the key's place in its dataset's block.
    return dataset_index, order - offsets[dataset_index]


class BlendableDataset(torch.utils.data.Dataset):
    """Item t -> item dataset_sample_index[t] of datasets[dataset_index[t]].

    `datasets[i]` may be None for a dataset that no sample draws from (weight 0).
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset | None],
        weights: Sequence[float],
        size: int,
        labels: Sequence[str] | None = None,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(len(weights))]
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, size)
        self.drawn = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for i, (dataset, drawn) in enumerate(zip(self.datasets, self.drawn)):
            available = 0 if dataset is None else len(dataset)
            if drawn > available:
                raise ValueError(
                    f"blend draws {drawn} samples from dataset {self.labels[i]}, "
                    f"which has {available}"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a blend of {len(self)} samples")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]


def samples_drawn(weights: Sequence[float], size: int) -> np.ndarray:
    """How many samples a blend of `size` draws from each dataset."""
    dataset_index, _ = blending_indices(weights, size)
    return np.bincount(dataset_index, minlength=len(weights))


def mixture_table(
    split: str,
    labels: Sequence[str],
    weights: Sequence[float],
    drawn: Sequence[int],
    samples_per_epoch: Sequence[int | None],
) -> str:
    """The realised mixture: per dataset the weight asked, samples drawn, share, epochs."""
    total = max(int(sum(drawn)), 1)
    width = max(len("dataset"), *(len(label) for label in labels))
    lines = [
        f"{split} data mixture ({int(sum(drawn)):,} samples):",
        f"  {'dataset':<{width}}  {'weight':>7}  {'samples':>10}  {'share':>7}  {'epochs':>8}",
    ]
    for label, weight, count, per_epoch in zip(labels, weights, drawn, samples_per_epoch):
        epochs = f"{count / per_epoch:8.3f}" if per_epoch else f"{'-':>8}"
        lines.append(
            f"  {label:<{width}}  {weight:7.4f}  {int(count):>10,}  "
            f"{100 * count / total:6.2f}%  {epochs}"
        )
    return "\n".join(lines)
