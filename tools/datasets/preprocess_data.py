"""Tokenize documents into NeoX `.bin/.idx` datasets, one per key.

    python tools/datasets/preprocess_data.py --input 'data/shard-*.jsonl.zst',extra.parquet \\
        --output-prefix data/mydata --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 4

writes `data/mydata_text_document.bin/.idx` (train with `data_path: data/mydata_text_document`).
Inputs are streamed in bounded batches through the workers; the outputs appear under their final
names only when every record was processed (an error or Ctrl-C leaves nothing behind).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from megatron.cli import exit_status
from megatron.data.indexed_dataset import (
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron.tokenizer import Tokenizer, build_tokenizer
from tools.datasets import readers
from tools.datasets.readers import PreprocessError
from tools.datasets.worker_pool import ordered_map

BATCH_BYTES = 1 << 20  # input bytes per task sent to a worker (a batch never spans files)
BATCH_RECORDS = 4096  # records per task, for inputs of many tiny documents

# (path, [(line or row number, payload), ...], input bytes)
Task = tuple[str, list[tuple[int, readers.Payload]], int]


@dataclass
class EncodedBatch:
    """One task's output: per key, the token ids of its documents concatenated, and the
    length of each (0 for an empty document, which is not written)."""

    records: int
    input_bytes: int
    ids: list[np.ndarray]
    lengths: list[list[int]]
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class EncodeOptions:
    tokenizer_type: str
    vocab_file: str | None
    merge_file: str | None
    keys: tuple[str, ...]
    append_eod: bool
    ftfy: bool
    skip_bad_lines: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        required=True,
        action="append",
        help="input files or globs, comma-separated; may be repeated. Processed in the order "
        "given, each glob's matches sorted. Formats by suffix: .jsonl, .jsonl.gz, .jsonl.zst "
        "(one JSON object per line), .parquet (the keys are string columns, read in row "
        "batches) and .txt (the whole file is one document, as lm_dataformat reads it for NeoX)",
    )
    group.add_argument(
        "--jsonl-keys",
        nargs="+",
        default=["text"],
        help="keys (parquet: columns) to tokenize; each becomes its own dataset "
        "{prefix}_{key}_document (default: text)",
    )
    group.add_argument(
        "--num-docs", type=int, default=None, help="documents expected, for the progress bar"
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count records that cannot be decoded (invalid JSON or UTF-8, not a JSON "
        "object) instead of stopping; a missing key or a non-string value is still an error",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type", required=True, help="a registered tokenizer name (megatron.tokenizer)"
    )
    group.add_argument("--vocab-file", default=None, help="the tokenizer's vocabulary/model file")
    group.add_argument("--merge-file", default=None, help="BPE merges (GPT2BPETokenizer)")
    group.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOD token"
    )
    group.add_argument(
        "--ftfy", action="store_true", help="repair mojibake with ftfy.fix_text before tokenizing"
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
    duplicates = sorted(k for k, n in Counter(args.jsonl_keys).items() if n > 1)
    if duplicates:
        parser.error(f"--jsonl-keys names {duplicates} more than once")
    return args


def encode_options(args: argparse.Namespace) -> EncodeOptions:
    return EncodeOptions(
        args.tokenizer_type,
        args.vocab_file,
        args.merge_file,
        tuple(args.jsonl_keys),
        args.append_eod,
        args.ftfy,
        args.skip_bad_lines,
    )


# Each worker process (or the main process when --workers 1) sets these once.
_options: EncodeOptions | None = None
_tokenizer: Tokenizer | None = None
_dtype: np.dtype = np.dtype(np.int32)


def init_encoder(options: EncodeOptions) -> None:
    global _options, _tokenizer, _dtype
    _options = options
    _tokenizer = build_tokenizer(options.tokenizer_type, options.vocab_file, options.merge_file)
    _dtype = np.dtype(best_dtype(_tokenizer.vocab_size))


def encode_task(task: Task) -> EncodedBatch:
    """Parse and tokenize one batch of records from one file."""
    assert _options is not None and _tokenizer is not None, "init_encoder was not called"
    path, records, input_bytes = task
    if _options.ftfy:
        import ftfy  # only with --ftfy: the import is slow
    ids: list[list[int]] = [[] for _ in _options.keys]
    lengths: list[list[int]] = [[] for _ in _options.keys]
    skipped: Counter[str] = Counter()
    for number, payload in records:
        texts = readers.parse_record(path, number, payload, _options.keys, _options.skip_bad_lines)
        if isinstance(texts, readers.BadRecord):
            skipped[texts.reason] += 1
            continue
        for key_ids, key_lengths, text in zip(ids, lengths, texts):
            if _options.ftfy:
                text = ftfy.fix_text(text)
            tokens = _tokenizer.tokenize(text)
            key_ids.extend(tokens)
            eod = bool(len(tokens)) and _options.append_eod  # NeoX: no EOD for an empty text
            if eod:
                key_ids.append(_tokenizer.eod)
            key_lengths.append(len(tokens) + eod)
    return EncodedBatch(len(records), input_bytes, [_as_dtype(i) for i in ids], lengths, skipped)


def _as_dtype(ids: list[int]) -> np.ndarray:
    """`ids` in the output dtype, so workers send (and the writer copies) 2-byte tokens."""
    values = np.array(ids, dtype=np.int64)
    limits = np.iinfo(_dtype)
    if values.size and (values.min() < limits.min or values.max() > limits.max):
        raise PreprocessError(
            f"tokenizer {_options.tokenizer_type} returned ids in [{values.min()}, "
            f"{values.max()}], outside the output dtype {_dtype} (vocab_size "
            f"{_tokenizer.vocab_size})"
        )
    return values.astype(_dtype)


def make_tasks(paths: Sequence[str], keys: Sequence[str]) -> Iterator[Task]:
    """Records of every file in order, in batches of about BATCH_BYTES."""
    for path in paths:
        input_format = readers.format_of(path)
        batch: list[tuple[int, readers.Payload]] = []
        size = 0
        for number, payload in readers.read_records(path, keys):
            batch.append((number, payload))
            size += input_format.size(payload)
            if size >= BATCH_BYTES or len(batch) >= BATCH_RECORDS:
                yield path, batch, size
                batch, size = [], 0
        if batch:
            yield path, batch, size


@dataclass
class KeyStats:
    documents: int = 0
    empty: int = 0
    tokens: int = 0


@dataclass
class Stats:
    files: int = 0
    records: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: Counter[str] = field(default_factory=Counter)
    keys: dict[str, KeyStats] = field(default_factory=dict)
    dtype: str = ""

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.keys.values())


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def write_batch(
    batch: EncodedBatch, builders: list[MMapIndexedDatasetBuilder], stats: Stats
) -> None:
    stats.records += batch.records
    stats.input_bytes += batch.input_bytes
    stats.skipped.update(batch.skipped)
    for builder, key_stats, ids, lengths in zip(
        builders, stats.keys.values(), batch.ids, batch.lengths
    ):
        start = 0
        for length in lengths:
            if not length:
                key_stats.empty += 1
                continue
            builder.add_item(ids[start : start + length])
            builder.end_document()
            key_stats.documents += 1
            start += length
        key_stats.tokens += start


def preprocess(args: argparse.Namespace) -> Stats:
    """Tokenize `args.input` into one dataset per key; returns the counts."""
    start = time.perf_counter()
    keys = args.jsonl_keys
    paths = readers.resolve_inputs(args.input, keys)
    options = encode_options(args)
    # Built here too so a bad tokenizer setting fails before any output file is opened.
    dtype = best_dtype(
        build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file).vocab_size
    )
    stats = Stats(len(paths), keys={key: KeyStats() for key in keys}, dtype=np.dtype(dtype).name)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    prefixes = [output_prefix(args.output_prefix, key) for key in keys]
    builders: list[MMapIndexedDatasetBuilder] = []
    finished: list[str] = []
    try:
        for prefix in prefixes:
            builders.append(MMapIndexedDatasetBuilder(data_file_path(prefix), dtype))
        # tqdm shows documents/s; the postfix adds tokens/s and MB/s.
        bar = tqdm(total=args.num_docs, unit="doc", file=sys.stderr, miniters=args.log_interval)
        with bar:
            for batch in ordered_map(
                encode_task, make_tasks(paths, keys), args.workers, init_encoder, (options,)
            ):
                write_batch(batch, builders, stats)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(
                    f"{stats.tokens / elapsed:,.0f} tokens/s, "
                    f"{stats.input_bytes / elapsed / 1e6:.1f} MB/s",
                    refresh=False,
                )
                bar.update(batch.records)
        for builder, prefix in zip(builders, prefixes):
            builder.finalize(index_file_path(prefix))
            finished.append(prefix)
    except BaseException:
        for builder in builders:
            builder.abort()
        # A later key's finalize failed: its siblings must not stay behind as a partial set.
        for prefix in finished:
            for path in (index_file_path(prefix), data_file_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)
        raise
    stats.seconds = time.perf_counter() - start
    return stats


def summary(args: argparse.Namespace, stats: Stats) -> str:
    seconds = max(stats.seconds, 1e-9)
    lines = [
        f"read {stats.records} records ({stats.input_bytes:,} bytes) from {stats.files} "
        f"file{'s' if stats.files != 1 else ''} "
        f"in {stats.seconds:.1f} s: {stats.records / seconds:,.0f} records/s, "
        f"{stats.tokens / seconds:,.0f} tokens/s, {stats.input_bytes / seconds / 1e6:.2f} MB/s"
    ]
    if stats.skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
        lines.append(f"skipped bad records: {reasons}")
    for key, s in stats.keys.items():
        prefix = output_prefix(args.output_prefix, key)
        size = os.path.getsize(data_file_path(prefix))
        lines.append(
            f"{key}: {s.documents} documents, {s.tokens:,} tokens ({stats.dtype}), "
            f"{size:,} bytes -> {prefix}.bin/.idx ({s.empty} empty documents skipped)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int | None:
        stats = preprocess(args)
        print(summary(args, stats))
        return 0

    return exit_status(work, (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
