"""Describe a NeoX `.bin/.idx` dataset, and show one document or one training sample.

    python tools/datasets/inspect_dataset.py data/mydata_text_document
    python tools/datasets/inspect_dataset.py data/mydata_text_document --document 3 \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt
    python tools/datasets/inspect_dataset.py data/mydata_text_document --sample 0 \
        --seq-length 2048 --seed 1234

prints the counts (documents, sequences, tokens), the dtype and a histogram of document lengths.
A document or sample is decoded with the tokenizer when one is given, else printed as ids.
Samples come from megatron.data's GPT2Dataset over all documents of the dataset.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from megatron.cli import exit_status
from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset, check_doc_idx
from megatron.tokenizer import Tokenizer, build_tokenizer

BAR_WIDTH = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefix", help="dataset prefix: PREFIX.bin and PREFIX.idx")
    group = parser.add_argument_group("tokenizer (to decode; without one, ids are printed)")
    group.add_argument("--tokenizer-type", default=None, help="a registered tokenizer name")
    group.add_argument("--vocab-file", default=None, help="the tokenizer's vocabulary/model file")
    group.add_argument("--merge-file", default=None, help="BPE merges (GPT2BPETokenizer)")
    group = parser.add_argument_group("what to show")
    group.add_argument("--document", type=int, default=None, help="show document i")
    group.add_argument("--sample", type=int, default=None, help="show training sample i")
    group.add_argument("--seq-length", type=int, default=None, help="sample length (--sample)")
    group.add_argument("--seed", type=int, default=1234, help="shuffling seed (--sample)")
    group.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples the dataset is built for, as in training (--sample; default i + 1); "
        "more samples mean more epochs and another order",
    )
    args = parser.parse_args(argv)
    if args.sample is not None and args.seq_length is None:
        parser.error("--sample needs --seq-length")
    if args.seq_length is not None and args.seq_length < 1:
        parser.error("--seq-length must be at least 1")
    if (args.vocab_file or args.merge_file) and not args.tokenizer_type:
        parser.error("--vocab-file/--merge-file need --tokenizer-type")
    return args


def document_lengths(dataset: MMapIndexedDataset) -> np.ndarray:
    """Tokens per document (a document is the sequences between two doc_idx entries)."""
    check_doc_idx(dataset)
    doc_idx = dataset.doc_idx
    ends = np.concatenate([[0], np.cumsum(dataset.sizes, dtype=np.int64)])
    return ends[doc_idx[1:]] - ends[doc_idx[:-1]]


def histogram_lines(lengths: np.ndarray) -> list[str]:
    """A text histogram with power-of-two bins: [1, 1], [2, 3], [4, 7], ... plus empty ones."""
    if len(lengths) == 0:
        return ["(no documents)"]
    # Bin b > 0 holds lengths in [2**(b - 1), 2**b - 1]; bin 0 holds empty documents.
    bins = np.zeros(len(lengths), dtype=np.int64)
    positive = lengths > 0
    bins[positive] = np.floor(np.log2(lengths[positive])).astype(np.int64) + 1
    counts = np.bincount(bins)
    peak = int(counts.max())
    lines = []
    first = int(np.flatnonzero(counts)[0])  # no rows for lengths below the shortest document
    for b, count in enumerate(counts[first:], start=first):
        low, high = (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)
        bar = "#" * max(1 if count else 0, round(BAR_WIDTH * int(count) / peak))
        lines.append(f"{low:>10} - {high:<10} |{bar:<{BAR_WIDTH}}| {count}")
    return lines


def summary(dataset: MMapIndexedDataset) -> str:
    lengths = document_lengths(dataset)
    lines = [
        f"dataset    {dataset.path_prefix}",
        f"dtype      {dataset.dtype}",
        f"documents  {len(lengths)}",
        f"sequences  {len(dataset)} (doc_idx: {len(dataset.doc_idx)} entries)",
        f"tokens     {int(dataset.sizes.sum(dtype=np.int64))}",
    ]
    if len(lengths):
        lines.append(
            f"document length (tokens): min {lengths.min()}, median {np.median(lengths):g}, "
            f"mean {lengths.mean():.1f}, max {lengths.max()}"
        )
    lines.append("histogram of document lengths (tokens | documents):")
    lines += histogram_lines(lengths)
    return "\n".join(lines)


def document_tokens(dataset: MMapIndexedDataset, index: int) -> np.ndarray:
    num_docs = len(dataset.doc_idx) - 1
    if not 0 <= index < num_docs:
        raise IndexError(f"--document {index} is out of range: the dataset has {num_docs}")
    first, last = int(dataset.doc_idx[index]), int(dataset.doc_idx[index + 1])
    pieces = [dataset.get(i) for i in range(first, last)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dataset.dtype)


def sample_tokens(
    dataset: MMapIndexedDataset, index: int, seq_length: int, seed: int, num_samples: int | None
) -> np.ndarray:
    """Sample `index` (in serving order) of a GPT2Dataset over every sequence of `dataset`."""
    from megatron.data.gpt2_dataset import GPT2Dataset  # imports torch: only when needed

    if index < 0:
        raise IndexError(f"--sample {index} is out of range: samples start at 0")
    wanted = max(index + 1, num_samples or 0)
    documents = np.arange(len(dataset), dtype=np.int64)
    samples = GPT2Dataset("inspect", dataset, documents, wanted, seq_length, seed)
    return samples[index]["text"]


def render(tokens: np.ndarray, tokenizer: Tokenizer | None) -> str:
    """The decoded text, or the ids when there is no tokenizer."""
    ids = [int(t) for t in tokens]
    if tokenizer is None:
        return str(ids)
    outside = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if outside:
        raise ValueError(
            f"token ids {outside[:5]} are outside {tokenizer.name}'s vocabulary "
            f"(size {tokenizer.vocab_size}); was the dataset made with another tokenizer?"
        )
    return tokenizer.detokenize(ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int | None:
        tokenizer = None
        if args.tokenizer_type:
            tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
        dataset = MMapIndexedDataset(args.prefix)
        print(summary(dataset))
        if args.document is not None:
            tokens = document_tokens(dataset, args.document)
            print(f"\n--- document {args.document}: {len(tokens)} tokens ---")
            print(render(tokens, tokenizer))
        if args.sample is not None:
            tokens = sample_tokens(
                dataset, args.sample, args.seq_length, args.seed, args.num_samples
            )
            print(
                f"\n--- sample {args.sample} (seq_length {args.seq_length}, seed {args.seed}): "
                f"{len(tokens)} tokens ---"
            )
            print(render(tokens, tokenizer))
        return 0

    return exit_status(work, (DatasetError, IndexError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
