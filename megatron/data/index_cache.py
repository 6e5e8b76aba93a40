"""Sample indices cached on disk as `.npy` files, built once per node and memory-mapped.

A cache entry is named after everything its arrays depend on: the data files (path, size and
modification time), the documents used and the build parameters are hashed into the name, so a
changed dataset or config gets a fresh entry instead of a stale one.

Location: beside the dataset (`{dir}/{dataset name}_{split}_indexmap_..._{hash}_{array}.npy`,
as GPT-NeoX does) when that folder is writable, else `$XDG_CACHE_HOME/strata/index` (default
`~/.cache/strata/index`). Global rank 0 builds a missing entry when every node sees the same files
(`use_shared_fs`, NeoX's default), else local rank 0 of every node does, writing each file to a
temporary name and renaming it; an all-reduce then releases the other ranks, which map the files
read-only. A failure on the building rank fails every rank instead of leaving them waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.data.indexed_dataset import DatasetError
from megatron.data.sample_index import IndexArrays

# Bump when the index layout or algorithm changes: old entries must not be reused.
INDEX_FORMAT = 2


def fallback_dir() -> Path:
    """Where entries go when the dataset's folder is not writable."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "strata" / "index"


def file_stamp(path: str) -> list[Any]:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def cache_key(files: Sequence[str], documents: np.ndarray, **params: Any) -> str:
    """A digest of the data files' identity, the documents used and the build parameters."""
    digest = hashlib.sha256()
    described = {"format": INDEX_FORMAT, "files": [file_stamp(f) for f in files], **params}
    digest.update(json.dumps(described, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(documents, dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


class IndexCache:
    """The files of one entry: `{stem}_{array}.npy` in the first directory holding all of them."""

    def __init__(self, directories: Sequence[str | os.PathLike[str]], stem: str) -> None:
        self.directories = [Path(d) for d in directories]
        self.stem = stem

    def paths(self, directory: Path) -> dict[str, Path]:
        return {field: directory / f"{self.stem}_{field}.npy" for field in IndexArrays._fields}

    def find(self) -> Path | None:
        """The directory holding a complete entry, if any."""
        for directory in self.directories:
            if all(p.is_file() for p in self.paths(directory).values()):
                return directory
        return None

    def load(self) -> IndexArrays:
        directory = self.find()
        if directory is None:
            raise DatasetError(
                f"sample index {self.stem} is missing from "
                f"{', '.join(str(d) for d in self.directories)} after it was built"
            )
        paths = self.paths(directory)
        return IndexArrays(*(np.load(paths[f], mmap_mode="r") for f in IndexArrays._fields))

    def save(self, arrays: IndexArrays) -> Path:
        """Write to the first writable directory; each file appears whole or not at all."""
        failures = []
        for directory in self.directories:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                paths = self.paths(directory)
                # epoch_ends goes last: an entry with every file present is complete.
                for field in IndexArrays._fields:
                    write_array(paths[field], getattr(arrays, field))
                return directory
            except OSError as err:
                failures.append(f"{directory}: {err}")
        raise DatasetError(f"cannot write sample index {self.stem}: " + "; ".join(failures))


def write_array(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.int64))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _builds_here(shared_fs: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return True
    if shared_fs:
        return dist.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _all_succeeded(ok: bool) -> bool:
    """All-reduce of success flags; doubles as the barrier after the build."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor([int(ok)], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_or_build(
    cache: IndexCache, build: Callable[[], IndexArrays], shared_fs: bool = True
) -> IndexArrays:
    """The cached entry, building it first when missing: on global rank 0 when the directories
    are on a filesystem all nodes share (`shared_fs`), else on local rank 0 of each node.

    Every process of a distributed run must call this for the same entries in the same order.
    """
    error: BaseException | None = None
    if _builds_here(shared_fs):
        try:
            if cache.find() is None:
                cache.save(build())
        except Exception as err:  # reported to the other ranks below, then re-raised
            error = err
    if not _all_succeeded(error is None):
        if error is not None:
            raise error
        raise DatasetError(
            f"building sample index {cache.stem} failed on another process (see its error)"
        )
    if shared_fs and cache.find() is None:
        raise DatasetError(
            f"sample index {cache.stem} was built by rank 0 but is not in "
            f"{', '.join(str(d) for d in cache.directories)} on this node: "
            "set use_shared_fs: false where nodes do not share these folders"
        )
    return cache.load()
