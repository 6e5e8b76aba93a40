"""The on-disk index cache: reuse, stale entries, the fallback folder, atomic files, and the
build-once-per-node protocol across processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from _data_fixtures import index_worker, write_documents

import megatron.data.gpt2_dataset as gpt2_dataset
import megatron.data.index_cache as index_cache
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.utils import free_port

pytestmark = pytest.mark.timeout(180)

SIZES = [12, 30, 7, 25, 18, 40, 9]


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    write_documents(tmp_path / "data" / "ds", SIZES)
    return tmp_path / "data" / "ds"


@pytest.fixture
def builds(monkeypatch) -> list[tuple]:
    """Records every index build."""
    calls: list[tuple] = []
    original = gpt2_dataset.build_index

    def recording(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(gpt2_dataset, "build_index", recording)
    return calls


def make(prefix: Path, num_samples: int = 20, **kwargs) -> GPT2Dataset:
    data = MMapIndexedDataset(prefix)
    return GPT2Dataset("train", data, np.arange(len(data)), num_samples, 8, 1, **kwargs)


def entry_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".npy")


def test_index_is_built_once_then_memory_mapped(prefix: Path, builds) -> None:
    first = make(prefix)
    files = entry_files(prefix.parent)
    assert len(files) == 4 and all(
        f.startswith("ds_train_indexmap_20ns_8sl_1s_packed_") for f in files
    )
    second = make(prefix)
    assert len(builds) == 1
    assert isinstance(second.shuffle_idx, np.memmap)
    for a, b in zip(
        (first.doc_idx, first.sample_idx, first.shuffle_idx),
        (second.doc_idx, second.sample_idx, second.shuffle_idx),
    ):
        np.testing.assert_array_equal(a, b)
    # Nothing temporary is left behind.
    assert not [p for p in prefix.parent.iterdir() if p.name.startswith(".")]


def test_changed_data_gets_a_fresh_index(prefix: Path, builds) -> None:
    old = make(prefix)
    old_text = [old[i]["text"].copy() for i in range(len(old))]
    # Same file names, other documents (and sizes): the old entry must not be reused.
    for suffix in (".bin", ".idx"):
        os.remove(f"{prefix}{suffix}")
    write_documents(prefix, [s + 3 for s in SIZES])
    new = make(prefix)
    assert len(builds) == 2
    assert len(entry_files(prefix.parent)) == 8
    stream = np.concatenate([new.indexed_dataset[int(d)] for d in new.doc_idx])
    s = int(new.shuffle_idx[0])
    np.testing.assert_array_equal(new[0]["text"], stream[s * 8 : s * 8 + 9])
    assert any(not np.array_equal(a, new[i]["text"]) for i, a in enumerate(old_text))


@pytest.mark.parametrize(
    "change", [{"num_samples": 21}, {"pack_impl": "unpacked"}, {"allow_chopped": False}]
)
def test_each_parameter_has_its_own_entry(prefix: Path, builds, change: dict) -> None:
    make(prefix, pack_impl="pack_until_overflow")
    kwargs = {"pack_impl": "pack_until_overflow", **change}
    make(prefix, **kwargs)
    assert len(builds) == 2


def test_other_documents_have_their_own_entry(prefix: Path, builds) -> None:
    data = MMapIndexedDataset(prefix)
    GPT2Dataset("train", data, np.arange(0, 5), 5, 8, 1)
    GPT2Dataset("train", data, np.arange(2, 7), 5, 8, 1)
    assert len(builds) == 2


def test_incomplete_entry_is_rebuilt(prefix: Path, builds) -> None:
    make(prefix)
    (last,) = [p for p in prefix.parent.iterdir() if p.name.endswith("_epoch_ends.npy")]
    last.unlink()
    ds = make(prefix)
    assert len(builds) == 2 and len(ds) > 0


def test_unwritable_data_folder_falls_back_to_the_user_cache(
    prefix: Path, tmp_path: Path, builds, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    original = index_cache.write_array

    def read_only_data_folder(path: Path, array: np.ndarray) -> None:
        if path.parent == prefix.parent:
            raise PermissionError(13, "Permission denied", str(path))
        original(path, array)

    monkeypatch.setattr(index_cache, "write_array", read_only_data_folder)
    make(prefix)
    fallback = tmp_path / "xdg" / "strata" / "index"
    assert len(entry_files(fallback)) == 4 and entry_files(prefix.parent) == []
    ds = make(prefix)
    assert len(builds) == 1 and isinstance(ds.doc_idx, np.memmap)


def test_no_writable_folder_is_a_clear_error(prefix: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def refuse(path: Path, array: np.ndarray) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(index_cache, "write_array", refuse)
    with pytest.raises(index_cache.DatasetError, match="cannot write sample index") as info:
        make(prefix)
    assert str(prefix.parent) in str(info.value) and "xdg" in str(info.value)


def test_cache_key_depends_on_everything(prefix: Path) -> None:
    files = [f"{prefix}.idx", f"{prefix}.bin"]
    base = dict(num_samples=5, seq_length=8, seed=1, pack_impl="packed", allow_chopped=True)
    key = index_cache.cache_key(files, np.arange(7), **base)
    assert key == index_cache.cache_key(files, np.arange(7), **base)
    assert key != index_cache.cache_key(files, np.arange(6), **base)
    for name, value in (("seed", 2), ("seq_length", 9), ("pack_impl", "unpacked")):
        assert key != index_cache.cache_key(files, np.arange(7), **{**base, name: value})
    os.utime(f"{prefix}.bin", ns=(0, 0))
    assert key != index_cache.cache_key(files, np.arange(7), **base)


# --- several processes -------------------------------------------------------------------------


def test_local_rank_0_builds_and_a_failure_reaches_every_rank(prefix: Path, tmp_path: Path) -> None:
    # Unpacked with labels that are all -100: only the build (on rank 0) finds nothing to learn.
    write_documents(tmp_path / "sft", SIZES, labels="masked")
    out = tmp_path / "out"
    out.mkdir()
    prefixes = [str(prefix), str(tmp_path / "sft")]
    mp.start_processes(
        index_worker, args=(2, free_port(), prefixes, str(out)), nprocs=2, start_method="spawn"
    )
    rank0, rank1 = (json.loads((out / f"{rank}.json").read_text()) for rank in range(2))
    # The good dataset: built by rank 0 alone, the same index mapped everywhere.
    assert rank0[0]["built"] and not rank1[0]["built"]
    assert rank0[0]["shuffle"] == rank1[0]["shuffle"] and len(rank0[0]["shuffle"]) >= 20
    # The bad one: rank 0 reports why, rank 1 fails too instead of waiting forever.
    assert "none of the 7 documents is eligible" in rank0[1]["error"]
    assert "failed on another process" in rank1[1]["error"]


@pytest.mark.parametrize("shared_fs", [True, False])
def test_use_shared_fs_builds_once_per_job_else_once_per_node(
    prefix: Path, tmp_path: Path, shared_fs: bool
) -> None:
    """Two one-process "nodes" (LOCAL_RANK 0 on both): NeoX's use_shared_fs builds on global
    rank 0 only; without it each node builds its own copy."""
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(
        index_worker,
        args=(2, free_port(), [str(prefix)], str(out), 2, shared_fs),
        nprocs=2,
        start_method="spawn",
    )
    rank0, rank1 = (json.loads((out / f"{rank}.json").read_text())[0] for rank in range(2))
    assert rank0["built"] and rank1["built"] is not shared_fs
    assert rank0["shuffle"] == rank1["shuffle"]
