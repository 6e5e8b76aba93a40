"""Sample-index build time: Strata's vectorised NumPy builder against a per-sample Python loop.

Synthetic document sizes (lognormal, mean about 500 tokens; 10 million documents, about 5 billion
tokens by default) are indexed for one epoch at seq_length 2048 from the sizes array alone (no
dataset on disk). The peer is the straightforward builder: the same document order, then a
Python loop that walks the stream sample by sample (packed) or document by document
(pack_until_overflow), then the same shuffle. It runs on a subset of the documents; its time is
reported for the subset, next to NumPy's on the same subset, and extrapolated linearly to the
full size. Both builders must produce the same sample index on the subset. Prints one JSON
object; timings are reported, never checked.

    .venv/bin/python benchmarks/index_build.py [--documents 10000000 --subset 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np

from megatron.data.sample_index import (
    DocumentOrder,
    build_index,
    build_shuffle_idx,
    index_generators,
    num_epochs_needed,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000_000)
    parser.add_argument("--mean-tokens", type=float, default=500.0)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--subset", type=int, default=100_000, help="documents for the peer")
    parser.add_argument("--pack-impl", choices=("packed", "pack_until_overflow"), default="packed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs on the subset")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args()


def synthetic_sizes(count: int, mean: float, seed: int) -> np.ndarray:
    """Lognormal document sizes (sigma 1) with the given mean, at least 1 token each."""
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2
    sizes = np.random.default_rng(seed).lognormal(mu, sigma, count)
    return np.maximum(sizes, 1).astype(np.int32)


def loop_packed(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Sample starts of the packed stream, one sample at a time."""
    sizes_list, order = sizes.tolist(), doc_idx.tolist()
    total = sum(sizes_list[d] for d in order)
    num_samples = (total - 1) // seq_length
    rows = [(0, 0)]
    position, offset = 0, 0
    for _ in range(num_samples):
        needed = seq_length  # the next sample starts seq_length tokens further on
        while needed:
            left = sizes_list[order[position]] - offset
            if left > needed:
                offset += needed
                needed = 0
            else:
                needed -= left
                position += 1
                offset = 0
        rows.append((position, offset))
    return np.array(rows, dtype=np.int64)


def loop_until_overflow(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Sample starts when whole documents are packed until the next would overflow."""
    capacity = seq_length + 1
    lengths = [min(int(sizes[d]), capacity) for d in doc_idx]
    starts, running = [0], 0
    for position, length in enumerate(lengths):
        if running and running + length > capacity:
            starts.append(position)
            running = 0
        running += length
    starts.append(len(lengths))
    return np.stack([np.array(starts), np.zeros(len(starts), dtype=np.int64)], axis=1)


def python_loop_index(sizes: np.ndarray, seq_length: int, seed: int, pack_impl: str):
    """The peer: same document order and shuffle as Strata's builder, the cutting in Python."""
    doc_rng, sample_rng = index_generators(seed)
    if pack_impl == "packed":
        epochs = num_epochs_needed(int(sizes.sum()), seq_length, 1)
        doc_idx = DocumentOrder(np.arange(len(sizes)), doc_rng).stream(epochs)
        sample_idx = loop_packed(sizes, doc_idx, seq_length)
    else:
        doc_idx = DocumentOrder(np.arange(len(sizes)), doc_rng).stream(1)
        sample_idx = loop_until_overflow(sizes, doc_idx, seq_length)
    num_built = len(sample_idx) - 1
    shuffle_idx = build_shuffle_idx(num_built, np.array([num_built]), num_built, sample_rng)
    return doc_idx, sample_idx, shuffle_idx


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result): the CPU time is the figure to trust
    on a shared machine, the wall time the one a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    args = parse_args()
    sizes = synthetic_sizes(args.documents, args.mean_tokens, args.seed)
    subset = sizes[: args.subset]
    seq, seed, impl = args.seq_length, args.seed, args.pack_impl

    def strata(s: np.ndarray):
        return build_index(s, 1, seq, seed, impl)  # one sample asked: one epoch is built

    numpy_cpu, loop_cpu = [], []
    for _ in range(args.repeats):
        _, cpu, fast = timed(lambda: strata(subset))
        numpy_cpu.append(cpu)
        _, cpu, slow = timed(lambda: python_loop_index(subset, seq, seed, impl))
        loop_cpu.append(cpu)
    for mine, theirs in zip(fast[:3], slow):
        np.testing.assert_array_equal(mine, theirs)  # same work, same answer
    full_wall, full_cpu, index = timed(lambda: strata(sizes))
    subset_numpy, subset_loop = statistics.median(numpy_cpu), statistics.median(loop_cpu)
    extrapolated = subset_loop * args.documents / args.subset
    print(
        json.dumps(
            {
                "pack_impl": impl,
                "documents": args.documents,
                "tokens": int(sizes.sum(dtype=np.int64)),
                "seq_length": seq,
                "samples": len(index.shuffle_idx),
                "epochs": index.num_epochs,
                "strata_numpy_wall_s": round(full_wall, 3),
                "strata_numpy_cpu_s": round(full_cpu, 3),
                "subset_documents": args.subset,
                "subset_numpy_cpu_s": round(subset_numpy, 4),
                "subset_python_loop_cpu_s": round(subset_loop, 4),
                "speedup_same_subset": round(subset_loop / subset_numpy, 1),
                "python_loop_extrapolated_cpu_s": round(extrapolated, 2),
                "speedup_vs_extrapolated": round(extrapolated / full_cpu, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
