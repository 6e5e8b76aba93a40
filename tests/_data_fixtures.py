"""Helpers for the data tests: token datasets whose tokens name their place, and a spawned
worker that builds a dataset's index in a gloo process group.

Kept apart from the test modules so spawned workers import only numpy, torch and megatron.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder


def write_documents(
    prefix: Path, sizes: list[int], base: int = 0, labels: str | None = None
) -> list[np.ndarray]:
    """Document d holds the tokens base + d * 1000 + 0, 1, ... so every token names its place.

    `labels="prompt"` also writes `{prefix}_label`: the tokens, with -100 on the first half of
    each document (a prompt) and on every token of documents whose index is a multiple of 4;
    `labels="masked"` writes -100 everywhere.
    """
    docs = [base + d * 1000 + np.arange(n) for d, n in enumerate(sizes)]
    with MMapIndexedDatasetBuilder(f"{prefix}.bin", np.int32) as builder:
        for doc in docs:
            builder.add_item(doc)
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
    if labels:
        with MMapIndexedDatasetBuilder(f"{prefix}_label.bin", np.int32) as builder:
            for d, doc in enumerate(docs):
                label = doc.copy()
                label[: len(doc) // 2] = -100
                if d % 4 == 0 or labels == "masked":
                    label[:] = -100
                builder.add_item(label)
                builder.end_document()
            builder.finalize(f"{prefix}_label.idx")
    return docs


def index_worker(
    rank: int,
    world_size: int,
    port: int,
    prefixes: list[str],
    out: str,
    nodes: int = 1,
    shared_fs: bool = True,
) -> None:
    """One spawned rank of a job on `nodes` nodes: build a GPT2Dataset over each prefix in turn
    (unpacked with labels when `{prefix}_label` exists, else packed) and write, per prefix,
    whether this rank built the index and what it got, or its error, to `{out}/{rank}.json`."""
    import torch.distributed as dist

    import megatron.data.gpt2_dataset as gpt2_dataset
    from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank % (world_size // nodes))
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    built: list[bool] = []
    original = gpt2_dataset.build_index

    def counting_build_index(*args, **kwargs):
        built.append(True)
        return original(*args, **kwargs)

    gpt2_dataset.build_index = counting_build_index
    results = []
    try:
        for prefix in prefixes:
            built.clear()
            data = MMapIndexedDataset(prefix)
            has_labels = Path(prefix + "_label.idx").exists()
            label = MMapIndexedDataset(prefix + "_label") if has_labels else None
            impl = "unpacked" if has_labels else "packed"
            try:
                ds = gpt2_dataset.GPT2Dataset(
                    "train",
                    data,
                    np.arange(len(data)),
                    20,
                    8,
                    5,
                    pack_impl=impl,
                    label_dataset=label,
                    shared_fs=shared_fs,
                )
                results.append({"built": bool(built), "shuffle": ds.shuffle_idx.tolist()})
            except DatasetError as err:
                results.append({"built": bool(built), "error": str(err)})
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(results))
