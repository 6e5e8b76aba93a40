"""Concatenate NeoX `.bin/.idx` datasets into one, keeping every document boundary.

    python tools/datasets/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document

An input may also be a folder: every dataset in it is merged, in name order (NeoX's form of
`--input`). All inputs must hold the same token dtype. The token files are copied in chunks, so
memory stays bounded; the output appears under its final name only when it is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron.cli import exit_status
from megatron.data.indexed_dataset import (
    DatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="dataset prefixes (PREFIX for PREFIX.bin/.idx) or folders of datasets, in order",
    )
    parser.add_argument(
        "--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx"
    )
    return parser.parse_args(argv)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Prefixes in merge order; a folder stands for the datasets in it, sorted by name."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p.with_suffix("")) for p in Path(item).glob("*.idx"))
            if not found:
                raise DatasetError(f"input folder {item} holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item)
    return prefixes


def open_inputs(prefixes: list[str]) -> list[MMapIndexedDataset]:
    """Every input, validated, all of one dtype: nothing is written before this passes."""
    datasets = [MMapIndexedDataset(prefix) for prefix in prefixes]
    first = datasets[0]
    for dataset in datasets[1:]:
        if dataset.dtype != first.dtype:
            raise DatasetError(
                f"{index_file_path(dataset.path_prefix)} holds {dataset.dtype} tokens, but "
                f"{index_file_path(first.path_prefix)} holds {first.dtype}; all inputs must "
                "share a dtype (preprocess them with the same tokenizer)"
            )
    return datasets


def merge(prefixes: list[str], output_prefix: str) -> MMapIndexedDataset:
    """Write the concatenation of `prefixes` to `output_prefix` and return it opened."""
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(prefix) == out for prefix in prefixes):
        raise DatasetError(f"--output-prefix {output_prefix} is also an input")
    datasets = open_inputs(prefixes)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with MMapIndexedDatasetBuilder(data_file_path(output_prefix), datasets[0].dtype) as builder:
        for dataset in datasets:
            builder.add_dataset(dataset)
        builder.finalize(index_file_path(output_prefix))
    return MMapIndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int | None:
        prefixes = expand_inputs(args.input)
        merged = merge(prefixes, args.output_prefix)
        documents = len(merged.doc_idx) - 1
        print(
            f"merged {len(prefixes)} datasets into {args.output_prefix}: {documents} documents, "
            f"{len(merged)} sequences, {int(merged.sizes.sum(dtype='int64'))} tokens ({merged.dtype})"
        )
        return 0

    return exit_status(work, (DatasetError, OSError))


if __name__ == "__main__":
    sys.exit(main())
