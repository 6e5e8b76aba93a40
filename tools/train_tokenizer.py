"""Train a byte-level BPE `tokenizer.json` from jsonl files (load it with tokenizer_type HFTokenizer).

    python tools/train_tokenizer.py --input data.jsonl --vocab-size 8192 --output tokenizer.json

The vocabulary holds the 256 byte symbols, `<|endoftext|>` (the end of document, id 0) and
`<|padding|>` (id 1), and learned merges up to --vocab-size.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from megatron.cli import exit_status
from tools.datasets.readers import iter_texts, resolve_inputs

SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="comma-separated .jsonl or .jsonl.gz files")
    parser.add_argument(
        "--jsonl-keys", nargs="+", default=["text"], help="keys holding text (default: text)"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="default: 8192")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest uses of a merge")
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (bytes + special tokens)")
    return args


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline that reproduces its input text exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train(paths: list[str], keys: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(iter_texts(paths, keys), trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, output: str) -> None:
    """Write `output` through a temporary file so a reader never sees half of it."""
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(output)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tokenizer.save(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int | None:
        tokenizer = train(
            resolve_inputs([args.input], args.jsonl_keys),
            args.jsonl_keys,
            args.vocab_size,
            args.min_frequency,
        )
        save(tokenizer, args.output)
        print(f"wrote {args.output}: vocab size {tokenizer.get_vocab_size()}")
        return 0

    return exit_status(work, (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
