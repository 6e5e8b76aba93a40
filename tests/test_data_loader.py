"""Packed samples, index building, splits, and the data-parallel-independent loader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron.data.data_utils import (
    build_train_valid_test_datasets,
    get_train_valid_test_split,
    make_data_loader,
)
from megatron.data.gpt2_dataset import (
    GPT2Dataset,
    build_index,
    build_sample_idx,
    num_epochs_needed,
)
from megatron.data.indexed_dataset import (
    DatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
)

SEQ = 16


def write_documents(prefix: Path, sizes: list[int]) -> list[np.ndarray]:
    """Document d holds the tokens d * 1000 + 0, 1, ... so every token names its place."""
    docs = [d * 1000 + np.arange(n) for d, n in enumerate(sizes)]
    with MMapIndexedDatasetBuilder(f"{prefix}.bin", np.int32) as builder:
        for doc in docs:
            builder.add_item(doc)
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
    return docs


@pytest.fixture
def sizes() -> list[int]:
    return np.random.default_rng(0).integers(1, 40, size=30).tolist()


@pytest.fixture
def data(tmp_path: Path, sizes: list[int]) -> MMapIndexedDataset:
    write_documents(tmp_path / "ds", sizes)
    return MMapIndexedDataset(tmp_path / "ds")


def reference_sample_idx(sizes, doc_idx, seq_length: int) -> np.ndarray:
    """A token-by-token walk of the stream: the plain definition the vectorised code must match."""
    stream = [(pos, off) for pos, d in enumerate(doc_idx) for off in range(sizes[d])]
    return np.array(stream[::seq_length][: (len(stream) - 1) // seq_length + 1])


def test_sample_idx_matches_a_token_walk(sizes: list[int]) -> None:
    doc_idx = np.random.default_rng(1).permutation(len(sizes))
    for seq_length in (1, 7, SEQ, 100):
        got = build_sample_idx(np.array(sizes), doc_idx, seq_length)
        np.testing.assert_array_equal(got, reference_sample_idx(sizes, doc_idx, seq_length))


def test_samples_tile_the_shuffled_stream(data: MMapIndexedDataset, sizes: list[int]) -> None:
    ds = GPT2Dataset("train", data, np.arange(len(sizes)), 100, SEQ, seed=3)
    stream = np.concatenate([data[int(d)] for d in ds.doc_idx])
    served = set()
    for i in range(len(ds)):
        text = ds[i]["text"]
        s = int(ds.shuffle_idx[i])
        assert text.dtype == np.int64 and text.shape == (SEQ + 1,)
        # Sample s is stream tokens [s*SEQ, (s+1)*SEQ]: its first token is sample s-1's last.
        np.testing.assert_array_equal(text, stream[s * SEQ : (s + 1) * SEQ + 1])
        served.add(s)
    assert served == set(range(len(ds)))
    assert len(ds) >= 100


def test_each_epoch_is_a_permutation_of_the_documents(sizes: list[int]) -> None:
    index = build_index(np.array(sizes), num_samples=200, seq_length=SEQ, seed=5)
    epochs = num_epochs_needed(sum(sizes), SEQ, 200)
    assert epochs > 1
    assert len(index.doc_idx) == epochs * len(sizes)
    for epoch in index.doc_idx.reshape(epochs, len(sizes)):
        assert sorted(epoch.tolist()) == list(range(len(sizes)))
    assert not np.array_equal(
        index.doc_idx[: len(sizes)], index.doc_idx[len(sizes) :][: len(sizes)]
    )
    # One epoch fewer would not have been enough.
    assert ((epochs - 1) * sum(sizes) - 1) // SEQ < 200 <= (epochs * sum(sizes) - 1) // SEQ


def test_complete_epochs_are_served_before_the_last(sizes: list[int]) -> None:
    index = build_index(np.array(sizes), num_samples=200, seq_length=SEQ, seed=5)
    epochs = len(index.doc_idx) // len(sizes)
    full = ((epochs - 1) * sum(sizes) - 1) // SEQ
    assert sorted(index.shuffle_idx[:full].tolist()) == list(range(full))
    assert sorted(index.shuffle_idx.tolist()) == list(range(len(index.sample_idx) - 1))


def test_empty_documents_are_skipped(tmp_path: Path) -> None:
    sizes = [0, 5, 0, 0, 9, 3, 0]
    write_documents(tmp_path / "ds", sizes)
    data = MMapIndexedDataset(tmp_path / "ds")
    ds = GPT2Dataset("train", data, np.arange(len(sizes)), 3, 4, seed=0)
    stream = np.concatenate([data[int(d)] for d in ds.doc_idx])
    for i in range(len(ds)):
        s = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds[i]["text"], stream[s * 4 : s * 4 + 5])


def test_index_is_deterministic_in_the_seed(sizes: list[int]) -> None:
    a = build_index(np.array(sizes), 50, SEQ, seed=7)
    b = build_index(np.array(sizes), 50, SEQ, seed=7)
    c = build_index(np.array(sizes), 50, SEQ, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)
    assert a.sample_idx.dtype == a.doc_idx.dtype == a.shuffle_idx.dtype == np.int64


def test_dataset_too_small(tmp_path: Path) -> None:
    write_documents(tmp_path / "tiny", [3, 4])
    data = MMapIndexedDataset(tmp_path / "tiny")
    with pytest.raises(DatasetError, match="too small") as info:
        GPT2Dataset("train", data, np.arange(2), 1, SEQ, seed=0)
    assert str(tmp_path / "tiny") in str(info.value)


# --- splits and the dataset builder ----------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "num_docs", "expected"),
    [
        ("969,30,1", 1000, [0, 969, 999, 1000]),
        ("8/1/1", 13, [0, 11, 12, 13]),
        ("100", 7, [0, 7, 7, 7]),
        ("1,1", 5, [0, 3, 5, 5]),  # round(2.5) == 2 twice; train absorbs the difference
        ("0,1,0", 5, [0, 0, 5, 5]),
    ],
)
def test_split_ranges(split: str, num_docs: int, expected: list[int]) -> None:
    assert get_train_valid_test_split(split, num_docs) == expected


@pytest.mark.parametrize("split", ["a,b", "0,0,0", "-1,2"])
def test_bad_split(split: str) -> None:
    with pytest.raises(ValueError, match="split"):
        get_train_valid_test_split(split, 10)


def args_for(**kwargs) -> SimpleNamespace:
    defaults = dict(seq_length=SEQ, seed=1234, data_impl="mmap", split="8,1,1", data_path=None)
    return SimpleNamespace(**{**defaults, **kwargs})


def test_datasets_from_data_path_stay_in_their_documents(tmp_path: Path) -> None:
    write_documents(tmp_path / "ds", [30] * 50)
    args = args_for(data_path=str(tmp_path / "ds"))
    train, valid, test = build_train_valid_test_datasets(args, (20, 5, 0))
    assert test is None
    bounds = get_train_valid_test_split("8,1,1", 50)
    for ds, (lo, hi) in ((train, bounds[0:2]), (valid, bounds[1:3])):
        assert len(ds) >= (20 if ds is train else 5)
        docs = np.concatenate([ds[i]["text"] for i in range(len(ds))]) // 1000
        assert docs.min() >= lo and docs.max() < hi


def test_datasets_from_separate_paths(tmp_path: Path) -> None:
    write_documents(tmp_path / "a", [40] * 5)
    write_documents(tmp_path / "b", [40] * 5)
    args = args_for(train_data_paths=[str(tmp_path / "a")], valid_data_paths=[str(tmp_path / "b")])
    train, valid, test = build_train_valid_test_datasets(args, (4, 2, 3))
    assert train is not None and valid is not None and test is None
    assert valid.indexed_dataset.path_prefix == str(tmp_path / "b")


def test_several_paths_per_split_are_refused(tmp_path: Path) -> None:
    write_documents(tmp_path / "a", [40] * 5)
    args = args_for(train_data_paths=[str(tmp_path / "a")] * 2)
    with pytest.raises(ValueError, match="train_data_paths lists 2 datasets"):
        build_train_valid_test_datasets(args, (4, 0, 0))


def test_other_data_impl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_impl 'cached'"):
        build_train_valid_test_datasets(args_for(data_impl="cached"), (1, 0, 0))


# --- the loader ------------------------------------------------------------------------------


def loader_rows(ds, consumed: int, mb: int, rank: int, dp: int) -> list[torch.Tensor]:
    loader = make_data_loader(ds, consumed, mb, rank, dp, num_workers=0)
    return [batch["text"] for batch in loader]


@pytest.fixture
def dataset(data: MMapIndexedDataset, sizes: list[int]) -> GPT2Dataset:
    return GPT2Dataset("train", data, np.arange(len(sizes)), 40, SEQ, seed=11)


def test_loader_batches(dataset: GPT2Dataset) -> None:
    batches = loader_rows(dataset, 0, 4, 0, 1)
    assert len(batches) == len(dataset) // 4
    assert batches[0].dtype == torch.int64
    assert batches[0].shape == (4, SEQ + 1)
    np.testing.assert_array_equal(batches[1][2].numpy(), dataset[6]["text"])


def test_data_parallel_ranks_split_the_single_process_order(dataset: GPT2Dataset) -> None:
    single = torch.cat(loader_rows(dataset, 0, 2, 0, 1))
    rank0, rank1 = loader_rows(dataset, 0, 2, 0, 2), loader_rows(dataset, 0, 2, 1, 2)
    assert len(rank0) == len(rank1) == len(dataset) // 4
    interleaved = torch.cat([torch.cat([a, b]) for a, b in zip(rank0, rank1)])
    assert torch.equal(interleaved, single[: len(interleaved)])


def test_resume_continues_at_the_same_global_sample(dataset: GPT2Dataset) -> None:
    single = torch.cat(loader_rows(dataset, 0, 2, 0, 1))
    resumed = torch.cat(loader_rows(dataset, 6, 2, 0, 1))
    assert torch.equal(resumed, single[6:][: len(resumed)])
    # Resumed with two data-parallel ranks instead of one.
    rank0, rank1 = loader_rows(dataset, 6, 2, 0, 2), loader_rows(dataset, 6, 2, 1, 2)
    interleaved = torch.cat([torch.cat([a, b]) for a, b in zip(rank0, rank1)])
    assert torch.equal(interleaved, single[6:][: len(interleaved)])


def test_loader_rejects_bad_positions(dataset: GPT2Dataset) -> None:
    with pytest.raises(ValueError, match="consumed_samples"):
        make_data_loader(dataset, len(dataset) + 1, 2, 0, 1, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        make_data_loader(dataset, 0, 2, 2, 2, 0)
    assert make_data_loader(None, 0, 2, 0, 1, 0) is None
