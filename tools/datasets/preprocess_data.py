"""Tokenize jsonl documents into NeoX `.bin/.idx` datasets, one per jsonl key.

    python tools/datasets/preprocess_data.py --input data.jsonl,more.jsonl.gz \
        --output-prefix data/mydata --tokenizer-type GPT2BPETokenizer \
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 4

writes `data/mydata_text_document.bin/.idx` (train with `data_path: data/mydata_text_document`).
Input is streamed in bounded batches; the outputs appear only when every line was processed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.pool import AsyncResult
from typing import IO

import numpy as np
from tqdm import tqdm

from megatron.data.indexed_dataset import (
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron.tokenizer import Tokenizer, build_tokenizer

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz")
BATCH_LINES = 64  # lines per task sent to a worker
PENDING_PER_WORKER = 4  # tasks in flight per worker; bounds memory


class PreprocessError(ValueError):
    """Bad input; the message names the file and line."""


# (file, line number, raw line)
Line = tuple[str, int, bytes]
# (input bytes, {key: token ids or None when empty})
Encoded = tuple[int, dict[str, np.ndarray | None]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="comma-separated .jsonl or .jsonl.gz files")
    group.add_argument(
        "--jsonl-keys",
        nargs="+",
        default=["text"],
        help="keys to tokenize; each becomes its own dataset (default: text)",
    )
    group.add_argument(
        "--num-docs", type=int, default=None, help="documents expected, for the progress bar"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, help="a registered tokenizer name")
    group.add_argument("--vocab-file", default=None, help="vocab.json or tokenizer.json")
    group.add_argument("--merge-file", default=None, help="BPE merges (GPT2BPETokenizer)")
    group.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD token"
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx"
    )
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"])
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument(
        "--log-interval", type=int, default=100, help="documents between progress updates"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    return args


def input_files(spec: str) -> list[str]:
    """The comma-separated input paths, checked to exist and to be jsonl."""
    paths = [p for p in spec.split(",") if p]
    if not paths:
        raise PreprocessError("--input names no files")
    for path in paths:
        if not path.endswith(INPUT_SUFFIXES):
            raise PreprocessError(
                f"{path}: expected a file ending in {' or '.join(INPUT_SUFFIXES)}"
            )
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: input file not found")
    return paths


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_lines(paths: Iterable[str]) -> Iterator[Line]:
    """Every non-blank line of every file, with its location."""
    for path in paths:
        with _open_binary(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield path, number, line


# Each worker process (or the main process when --workers 1) builds these once.
_tokenizer: Tokenizer | None = None
_keys: list[str] = []
_append_eod = False


def init_encoder(
    tokenizer_type: str,
    vocab_file: str | None,
    merge_file: str | None,
    keys: list[str],
    append_eod: bool,
) -> None:
    global _tokenizer, _keys, _append_eod
    _tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    _keys = keys
    _append_eod = append_eod


def parse_record(path: str, number: int, line: bytes, keys: list[str]) -> dict[str, str]:
    """The text under each of `keys` in one jsonl line."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreprocessError(f"{path}:{number}: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise PreprocessError(
            f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
        )
    texts = {}
    for key in keys:
        if key not in record:
            raise PreprocessError(f"{path}:{number}: missing key {key!r} (has {sorted(record)})")
        text = record[key]
        if not isinstance(text, str):
            raise PreprocessError(
                f"{path}:{number}: key {key!r} must be a string, got {type(text).__name__}"
            )
        texts[key] = text
    return texts


def encode_line(path: str, number: int, line: bytes) -> Encoded:
    """Token ids per key of one jsonl line; None for a key whose text has no tokens."""
    assert _tokenizer is not None, "init_encoder was not called"
    encoded: dict[str, np.ndarray | None] = {}
    for key, text in parse_record(path, number, line, _keys).items():
        ids = _tokenizer.tokenize(text)
        if ids and _append_eod:
            ids.append(_tokenizer.eod)
        encoded[key] = np.asarray(ids, dtype=np.int64) if ids else None
    return len(line), encoded


def encode_batch(batch: list[Line]) -> list[Encoded]:
    return [encode_line(*item) for item in batch]


def _batches(lines: Iterator[Line], size: int) -> Iterator[list[Line]]:
    while batch := list(islice(lines, size)):
        yield batch


def encode_stream(lines: Iterator[Line], args: argparse.Namespace) -> Iterator[Encoded]:
    """Encoded documents in input order, from `args.workers` processes."""
    init_args = (args.tokenizer_type, args.vocab_file, args.merge_file, args.jsonl_keys)
    init_args += (args.append_eod,)
    if args.workers == 1:
        init_encoder(*init_args)
        for batch in _batches(lines, BATCH_LINES):
            yield from encode_batch(batch)
        return
    # spawn, not fork: the caller may already hold torch or tokenizer threads.
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=init_encoder, initargs=init_args) as pool:
        # Like Pool.imap with a chunksize, but with a bounded number of chunks in flight.
        pending: deque[AsyncResult] = deque()
        for batch in _batches(lines, BATCH_LINES):
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= PENDING_PER_WORKER * args.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


@dataclass
class KeyStats:
    documents: int = 0
    empty: int = 0
    tokens: int = 0


@dataclass
class Stats:
    lines: int = 0
    input_bytes: int = 0
    keys: dict[str, KeyStats] = field(default_factory=dict)


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def preprocess(args: argparse.Namespace) -> Stats:
    """Tokenize `args.input` into one dataset per key; returns the counts."""
    paths = input_files(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    dtype = best_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    stats = Stats(keys={key: KeyStats() for key in args.jsonl_keys})
    builders: dict[str, MMapIndexedDatasetBuilder] = {}
    try:
        for key in args.jsonl_keys:
            prefix = output_prefix(args.output_prefix, key)
            builders[key] = MMapIndexedDatasetBuilder(data_file_path(prefix), dtype)
        start = time.perf_counter()
        # tqdm shows documents/s itself; the postfix adds tokens/s.
        with tqdm(total=args.num_docs, unit="doc", file=sys.stderr) as bar:
            for input_bytes, encoded in encode_stream(read_lines(paths), args):
                stats.lines += 1
                stats.input_bytes += input_bytes
                for key, ids in encoded.items():
                    key_stats = stats.keys[key]
                    if ids is None:
                        key_stats.empty += 1
                        continue
                    builders[key].add_item(ids)
                    builders[key].end_document()
                    key_stats.documents += 1
                    key_stats.tokens += len(ids)
                if stats.lines % args.log_interval == 0:
                    bar.update(args.log_interval)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    tokens = sum(s.tokens for s in stats.keys.values())
                    bar.set_postfix_str(f"{tokens / elapsed:.0f} tokens/s")
            bar.update(stats.lines % args.log_interval)
        for key, builder in builders.items():
            builder.finalize(index_file_path(output_prefix(args.output_prefix, key)))
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    return stats


def summary(args: argparse.Namespace, stats: Stats, seconds: float) -> str:
    lines = [
        f"read {stats.lines} documents ({stats.input_bytes} bytes) in {seconds:.1f} s "
        f"({stats.lines / max(seconds, 1e-9):.0f} docs/s)"
    ]
    for key, s in stats.keys.items():
        prefix = output_prefix(args.output_prefix, key)
        size = os.path.getsize(data_file_path(prefix))
        lines.append(
            f"{key}: {s.documents} documents, {s.tokens} tokens, {size} bytes -> "
            f"{prefix}.bin/.idx ({s.empty} empty documents skipped)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        stats = preprocess(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(args, stats, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
