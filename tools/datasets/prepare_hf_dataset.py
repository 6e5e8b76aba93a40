"""Prepare a Hugging Face dataset for training: load it, export it as jsonl, tokenize it.

    python tools/datasets/prepare_hf_dataset.py (--hf-dataset ORG/NAME [--config C] [--revision R]
        | --local PATH) [--split train] --output-prefix data/name
        [--text-key text] (--tokenizer-type T [--vocab-file F] [--merge-file F] | --tokenizer-path P)
        [--append-eod] [--workers N] [--count-only] [--skip-export] [--skip-tokenize]

A dataset with a `messages` or `conversations` column (the chat format; ShareGPT's from/value
turns are mapped to roles) is tokenized with preprocess_data_with_chat_template.py and a
tokenizer's chat template (--tokenizer-path: a folder or a Hub id); any other is plain text
under --text-key, tokenized with preprocess_data.py. The export is `{prefix}_export.jsonl`
(--skip-export reuses it; --skip-tokenize stops after it); --count-only writes nothing and prints
the documents and tokens. `pipeline_results.json` beside the outputs records documents, tokens,
output prefixes, the tokenizer and the time taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron.cli import exit_status
from megatron.utils import atomic_write_json
from tools.datasets import hf_source
from tools.datasets import preprocess_data as plain
from tools.datasets import preprocess_data_with_chat_template as chat
from tools.datasets.readers import PreprocessError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dataset", help="a dataset on the Hub, namespace/name")
    source.add_argument("--local", help="a save_to_disk folder, or parquet / jsonl files")
    parser.add_argument("--config", help="the dataset's configuration (subset)")
    parser.add_argument("--split", default="train", help="default: train")
    parser.add_argument("--revision", help="with --hf-dataset: branch, tag or commit")
    parser.add_argument("--text-key", default="text", help="the text column (default: text)")
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}_*_document")
    parser.add_argument("--tokenizer-type", help="plain text: a registered tokenizer name")
    parser.add_argument("--vocab-file", help="plain text: the tokenizer's vocabulary file")
    parser.add_argument("--merge-file", help="plain text: BPE merges")
    parser.add_argument("--tokenizer-path", help="conversations: a tokenizer folder or Hub id")
    parser.add_argument("--append-eod", action="store_true", help="end documents with EOD")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--count-only", action="store_true", help="count; write nothing")
    parser.add_argument("--skip-export", action="store_true", help="reuse the jsonl export")
    parser.add_argument("--skip-tokenize", action="store_true", help="stop after the export")
    args = parser.parse_args(argv)
    if args.revision and not args.hf_dataset:
        parser.error("--revision needs --hf-dataset")
    return args


def load(args: argparse.Namespace):
    if args.hf_dataset:
        return hf_source.load_hub(args.hf_dataset, args.config, args.split, args.revision)
    return hf_source.load_local(Path(args.local), args.split)


def tokenizer_args(args: argparse.Namespace, kind: str) -> list[str]:
    """The tokenizer flags of the matching preprocessing tool; an error naming what is missing."""
    if kind == "chat":
        if not args.tokenizer_path:
            raise PreprocessError(
                "the dataset holds conversations: pass --tokenizer-path (a tokenizer with a chat "
                "template)"
            )
        return ["--tokenizer-path", args.tokenizer_path]
    if not args.tokenizer_type:
        raise PreprocessError("the dataset holds plain text: pass --tokenizer-type")
    flags = ["--tokenizer-type", args.tokenizer_type]
    for flag, value in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        flags += [flag, value] if value else []
    return flags


def count(dataset, kind: str, key: str, args: argparse.Namespace) -> tuple[int, int]:
    """(documents, tokens) as the preprocessing would write them."""
    eod = 1 if args.append_eod else 0
    if kind == "chat":
        tokenizer = chat.load_tokenizer(chat.tokenizer_folder(args.tokenizer_path))

        def length(value) -> int:
            ids = tokenizer.apply_chat_template(hf_source.as_messages(value), tokenize=True)
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        from megatron.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)

        def length(value) -> int:
            return len(tokenizer.tokenize(value))

    lengths = [length(row[key]) for row in dataset]
    return len(lengths), sum(lengths) + eod * len(lengths)


def tokenize(
    export: Path, kind: str, flags: list[str], args: argparse.Namespace
) -> tuple[int, int, list[str]]:
    """(documents, tokens, output prefixes) of the matching preprocessing tool's run."""
    argv = ["--input", str(export), "--output-prefix", args.output_prefix]
    argv += ["--workers", str(args.workers), *flags]
    argv += ["--append-eod"] if args.append_eod else []
    if kind == "chat":
        stats = chat.preprocess(chat.parse_args(argv))
        prefixes = [
            plain.output_prefix(args.output_prefix, name) for name in ("messages", "messages_label")
        ]
        return stats.records, stats.tokens["messages"], prefixes
    stats = plain.preprocess(plain.parse_args(argv))
    return stats.records, stats.tokens, [plain.output_prefix(args.output_prefix, "text")]


def prepare(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    export = Path(f"{args.output_prefix}_export.jsonl")
    dataset = None
    if not args.skip_export or args.count_only:
        dataset = load(args)
        kind, key = hf_source.detect(dataset.column_names, args.text_key)
    else:
        if not export.is_file():
            raise PreprocessError(f"--skip-export: {export} does not exist (run without it once)")
        first = json.loads(export.open().readline() or "{}")
        kind, key = ("chat", "messages") if "messages" in first else ("text", "text")
    results = {
        "source": args.hf_dataset or str(Path(args.local).resolve()),
        "config": args.config,
        "split": args.split,
        "revision": args.revision,
        "kind": kind,
        "column": key,
    }
    # Checked before anything is written.
    flags = [] if args.skip_tokenize and not args.count_only else tokenizer_args(args, kind)
    if args.count_only:
        results["documents"], results["tokens"] = count(dataset, kind, key, args)
        return results
    if not args.skip_export:
        results["documents"] = hf_source.export_jsonl(dataset, kind, key, export)
    results["export"] = str(export)
    if not args.skip_tokenize:
        counts = tokenize(export, kind, flags, args)
        results["documents"], results["tokens"], results["outputs"] = counts
        results["tokenizer"] = dict(zip(flags[::2], flags[1::2]))
    results["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_json(Path(args.output_prefix).parent / "pipeline_results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int | None:
        print(json.dumps(prepare(args), indent=2))
        return 0

    return exit_status(work, (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
