"""Preprocessing throughput: preprocess_data.py against a plain `tokenizers` + NumPy loop.

The Brown corpus ($STRATA_ASSETS/corpora/brown.jsonl, ~6 MB) is replicated into a temporary
jsonl of at least --size-mb megabytes (10^6 bytes) and tokenized with the GPT-2 BPE files, with
--append-eod, by:

* strata, 1 and 2 workers: `preprocess_data.preprocess`, the tool's own code path (reading,
  worker processes, progress bar, `.bin/.idx` writing);
* reference: one process that parses the same jsonl in chunks, calls `tokenizers`' batch encode
  (`ByteLevelBPETokenizer` from the same vocab/merges files; it uses its own thread pool) and
  writes the ids with NumPy.

Both must produce the same token stream (checked). Prints one JSON object: MB/s of input jsonl
and tokens/s for each, and the ratios strata / reference. Timings are reported, never checked.

    .venv/bin/python benchmarks/preprocess.py [--size-mb 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import ByteLevelBPETokenizer

from tools.datasets import preprocess_data

REFERENCE_BATCH_DOCS = 256  # documents per encode_batch call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100, help="input size (10^6 bytes)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--assets", default=os.environ.get("STRATA_ASSETS"), help="default: $STRATA_ASSETS"
    )
    args = parser.parse_args(argv)
    if not args.assets:
        parser.error("set STRATA_ASSETS or pass --assets (needs the Brown corpus and GPT-2 files)")
    if args.size_mb <= 0:
        parser.error("--size-mb must be positive")
    return args


def replicate(source: Path, target: Path, size_bytes: float) -> int:
    """Concatenate copies of `source` into `target` until it holds at least `size_bytes`."""
    data = source.read_bytes()
    if not data.endswith(b"\n"):
        data += b"\n"
    copies = max(1, -int(-size_bytes // len(data)))
    with open(target, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return copies


def reference(corpus: Path, output: Path, vocab: Path, merges: Path) -> tuple[float, int]:
    """Tokenize `corpus` with plain `tokenizers` batch encode; returns (seconds, tokens)."""
    start = time.perf_counter()
    tokenizer = ByteLevelBPETokenizer(str(vocab), str(merges))
    eod = tokenizer.token_to_id("<|endoftext|>")
    tokens = 0

    def flush(texts: list[str], out) -> int:
        encodings = tokenizer.encode_batch(texts)
        ids = np.concatenate([np.array(e.ids + [eod], dtype=np.uint16) for e in encodings])
        ids.tofile(out)
        return ids.size

    with open(corpus, "rb") as src, open(output, "wb") as out:
        texts: list[str] = []
        for line in src:
            texts.append(json.loads(line)["text"])
            if len(texts) == REFERENCE_BATCH_DOCS:
                tokens += flush(texts, out)
                texts = []
        if texts:
            tokens += flush(texts, out)
    return time.perf_counter() - start, tokens


def strata(corpus: Path, prefix: Path, vocab: Path, merges: Path, workers: int):
    """Run the tool's preprocess(); returns (seconds, Stats)."""
    argv = ["--input", str(corpus), "--output-prefix", str(prefix), "--append-eod"]
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab)]
    argv += ["--merge-file", str(merges), "--workers", str(workers)]
    start = time.perf_counter()
    stats = preprocess_data.preprocess(preprocess_data.parse_args(argv))
    return time.perf_counter() - start, stats


def figures(seconds: float, input_bytes: int, tokens: int) -> dict[str, float]:
    return {
        "seconds": round(seconds, 2),
        "mb_per_s": round(input_bytes / seconds / 1e6, 3),
        "tokens_per_s": round(tokens / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    assets = Path(args.assets)
    brown = assets / "corpora" / "brown.jsonl"
    vocab = assets / "tokenizers" / "gpt2-vocab.json"
    merges = assets / "tokenizers" / "gpt2-merges.txt"
    with tempfile.TemporaryDirectory(prefix="strata-bench-preprocess-") as tmp:
        folder = Path(tmp)
        corpus = folder / "brown.jsonl"
        copies = replicate(brown, corpus, args.size_mb * 1e6)
        input_bytes = corpus.stat().st_size
        ref_seconds, ref_tokens = reference(corpus, folder / "reference.bin", vocab, merges)
        reference_ids = np.fromfile(folder / "reference.bin", dtype=np.uint16)
        result: dict[str, object] = {
            "corpus": f"brown.jsonl x{copies}",
            "input_mb": round(input_bytes / 1e6, 1),
            "tokens": ref_tokens,
            "tokenizer": "GPT2BPETokenizer (gpt2-vocab.json, gpt2-merges.txt)",
            "cpu_count": os.cpu_count(),
            "reference": figures(ref_seconds, input_bytes, ref_tokens),
        }
        for workers in args.workers:
            prefix = folder / f"strata{workers}"
            seconds, stats = strata(corpus, prefix, vocab, merges, workers)
            ours = np.fromfile(f"{prefix}_text_document.bin", dtype=np.uint16)
            if not np.array_equal(ours, reference_ids):
                print(
                    f"error: strata with {workers} workers wrote {ours.size} tokens that differ "
                    f"from the reference's {reference_ids.size}; the timings are not comparable",
                    file=sys.stderr,
                )
                return 1
            key = f"strata_workers_{workers}"
            result[key] = figures(seconds, input_bytes, stats.tokens)
            result[f"ratio_strata_workers_{workers}_to_reference"] = round(ref_seconds / seconds, 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
