"""Tokenize chat conversations with a Hugging Face chat template into NeoX datasets (SFT, DPO, KTO).

    python tools/datasets/preprocess_data_with_chat_template.py --input chats.jsonl \\
        --output-prefix data/chat --tokenizer-path HF_TOKENIZER_DIR --workers 2

--tokenizer-path also takes a Hub id (namespace/name, or namespace/name@revision): its tokenizer
files are fetched through huggingface_hub's cache (HF_HUB_OFFLINE=1 uses the cache alone).

Every jsonl record holds a conversation under each `--jsonl-keys` key (default `messages`): a
list of {"role": ..., "content": ...} messages. For each key it writes

    {prefix}_{key}_document        the tokens: exactly apply_chat_template(conversation,
                                   tokenize=True), plus the EOD token with --append-eod
    {prefix}_{key}_label_document  one label per token: the token id on the tokens of every
                                   --generation-role turn (its reply up to and including its
                                   end-of-turn token), -100 elsewhere (no loss); not written
                                   with --no-mask, which trains on every token

--only-last-turn labels only the last assistant turn. A token that straddles the start of a
turn belongs to the text before it. `--pairwise` reads `chosen` and `rejected` conversations
(one document each per record, so the two datasets stay aligned one to one) for DPO;
`--prompt-key` prepends a shared prompt conversation to each. `--reward-key` (KTO) writes
`{prefix}_{key}_reward_document`: one float per document, +1 / -1 for a true / false value,
or the number given. The template must render a conversation's prefixes as prefixes of the
whole conversation (true of ChatML, Llama, Mistral and most templates); one that rewrites
earlier turns is reported as an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron.cli import exit_status
from megatron.data.indexed_dataset import (
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron.tokenizer.hf import EOD_CANDIDATES, configured_eod
from tools.datasets.preprocess_data import make_tasks, output_prefix
from tools.datasets.readers import PreprocessError, location, resolve_inputs
from tools.datasets.worker_pool import ordered_map

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
IGNORE = -100

# (jsonl path, [(line number, line bytes), ...], input bytes), from preprocess_data.make_tasks.
Task = tuple[str, list[tuple[int, bytes]], int]


@dataclass(frozen=True)
class ChatOptions:
    tokenizer_path: str
    keys: tuple[str, ...]
    prompt_key: str | None
    generation_role: str
    only_last_turn: bool
    no_mask: bool
    append_eod: bool
    reward_key: str | None
    trust_remote_code: bool = False


@dataclass
class Encoded:
    """One record: per key its tokens and labels (None with --no-mask), and its reward."""

    tokens: list[np.ndarray]
    labels: list[np.ndarray | None]
    reward: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        required=True,
        action="append",
        help="jsonl files (.jsonl, .jsonl.gz, .jsonl.zst) or globs, comma-separated; may repeat",
    )
    group.add_argument(
        "--jsonl-keys",
        nargs="+",
        default=None,
        help="keys holding a conversation; each becomes its own dataset (default: messages; "
        "with --pairwise: chosen rejected)",
    )
    group.add_argument(
        "--pairwise",
        action="store_true",
        help="DPO data: exactly two keys, chosen then rejected; prints the pos_/neg_ config",
    )
    group.add_argument(
        "--prompt-key",
        default=None,
        help="a key whose conversation is prepended to each key's (e.g. TRL's `prompt`)",
    )
    group.add_argument(
        "--reward-key",
        default=None,
        help="KTO: a key holding true/false (desirable or not) or a number; writes "
        "{prefix}_{key}_reward_document",
    )
    group.add_argument("--num-docs", type=int, default=None, help="records, for the progress bar")
    group = parser.add_argument_group("labels")
    group.add_argument(
        "--generation-role", default="assistant", help="role whose turns get labels (assistant)"
    )
    group.add_argument(
        "--only-last-turn",
        "--only-last",
        action="store_true",
        help="label only the last turn of the generation role",
    )
    group.add_argument(
        "--no-mask", action="store_true", help="train on every token: write no label dataset"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-path",
        required=True,
        help="a Hugging Face tokenizer directory with a chat template, or a Hub id "
        "(namespace/name[@revision]) whose tokenizer files are fetched into the cache",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run Python code shipped in the tokenizer directory (off: only "
        "pass it for a directory you trust)",
    )
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="end every document with the EOD token (not labelled unless --no-mask)",
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx etc."
    )
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"])
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument(
        "--log-interval", type=int, default=100, help="records between progress updates"
    )
    args = parser.parse_args(argv)
    if args.jsonl_keys is None:
        args.jsonl_keys = ["chosen", "rejected"] if args.pairwise else ["messages"]
    if args.pairwise and len(args.jsonl_keys) != 2:
        parser.error(f"--pairwise needs exactly two keys (chosen rejected), got {args.jsonl_keys}")
    if len(set(args.jsonl_keys)) != len(args.jsonl_keys):
        parser.error(f"--jsonl-keys names a key twice: {args.jsonl_keys}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    return args


# -- the tokenizer -------------------------------------------------------------------------------


def tokenizer_folder(path: str) -> str:
    """`path` itself, or for a Hub id that is not a local path, the cached snapshot of its
    tokenizer files (the workers then read local files only)."""
    from megatron.hub.client import REPO_ID
    from megatron.hub.download import download_tokenizer

    repo_id, _, revision = path.partition("@")
    if os.path.exists(path) or not REPO_ID.fullmatch(repo_id):
        return path
    return str(download_tokenizer(repo_id, revision or None))


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The Hugging Face tokenizer in directory `path` (local files only), with a chat template;
    code shipped in the directory runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise PreprocessError(f"--tokenizer-path {path}: not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PreprocessError(f"--tokenizer-path {path}: cannot load a tokenizer: {err}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise PreprocessError(f"--tokenizer-path {path}: the tokenizer has no chat template")
    if not tokenizer.is_fast:
        raise PreprocessError(
            f"--tokenizer-path {path}: needs a fast tokenizer (tokenizer.json) for token offsets"
        )
    return tokenizer


def eod_id(tokenizer: Any, folder: str | None = None) -> int | None:
    """The EOD token Strata's HFTokenizer picks for the same folder (the configured end of
    sequence, else a known name), else the tokenizer's EOS token."""
    vocab = tokenizer.get_vocab()
    configured = configured_eod(folder, vocab.get) if folder is not None else None
    if configured is not None:
        return configured[0]
    found = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
    return found if found is not None else tokenizer.eos_token_id


def special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of special tokens; a turn's labels end at its last one (the end-of-turn token)."""
    added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset([*tokenizer.all_special_ids, *added])


# -- one conversation ----------------------------------------------------------------------------


class ChatEncoder:
    """Tokens and labels of conversations under one tokenizer and set of options."""

    def __init__(self, options: ChatOptions) -> None:
        self.options = options
        self.tokenizer = load_tokenizer(options.tokenizer_path, options.trust_remote_code)
        self.special = special_ids(self.tokenizer)
        self.eod = eod_id(self.tokenizer, options.tokenizer_path)
        if options.append_eod and self.eod is None:
            raise PreprocessError(
                f"--append-eod: the tokenizer in {options.tokenizer_path} has no EOD/EOS token"
            )

    def render(self, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja2 errors, and raise_exception() in templates
            raise PreprocessError(
                f"{where}: the chat template rejects this conversation: {err}"
            ) from None

    def turn_span(self, messages: list[dict], i: int, text: str, where: str) -> tuple[int, int]:
        """Characters [start, end) of `text` (the whole conversation) holding the reply of
        message i: after the conversation so far and the template's generation prompt (the
        turn's header), through the end of the message."""
        before = self.render(messages[:i], where, generation_prompt=True)
        through = self.render(messages[: i + 1], where)
        if not (
            text.startswith(through) and through.startswith(before) and len(before) < len(through)
        ):
            raise PreprocessError(
                f"{where}: the chat template does not render the conversation before message {i} "
                "(with its generation prompt) and through it as prefixes of the whole "
                "conversation, so the turn cannot be located"
            )
        return len(before), len(through)

    def encode(self, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray | None]:
        options = self.options
        text = self.render(messages, where)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = np.asarray(encoding["input_ids"], dtype=np.int64)
        labels = None
        if not options.no_mask:
            labels = np.full(len(tokens), IGNORE, dtype=np.int64)
            turns = [i for i, m in enumerate(messages) if m["role"] == options.generation_role]
            if not turns:
                raise PreprocessError(
                    f"{where}: no {options.generation_role!r} message, so nothing to learn from"
                )
            starts = np.asarray([start for start, _ in encoding["offset_mapping"]], np.int64)
            for i in turns[-1:] if options.only_last_turn else turns:
                begin, end = self.turn_span(messages, i, text, where)
                first, stop = np.searchsorted(starts, [begin, end])
                # The labels end with the turn's last special token (its end-of-turn marker):
                # what follows it (a newline) is template layout, not the reply.
                marks = [j for j in range(first, stop) if tokens[j] in self.special]
                stop = marks[-1] + 1 if marks else stop
                labels[first:stop] = tokens[first:stop]
        if options.append_eod:
            tokens = np.append(tokens, self.eod)
            if labels is not None:
                labels = np.append(labels, IGNORE)
        return tokens, labels


# -- one record ----------------------------------------------------------------------------------


def _messages(value: Any, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PreprocessError(
            f"{where}: key {key!r} must be a non-empty list of messages, got "
            f"{type(value).__name__ if value else repr(value)}"
        )
    for n, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PreprocessError(
                f"{where}: {key}[{n}] must be an object with a string 'role', got {message!r}"
            )
        if not isinstance(message.get("content"), str | list):
            raise PreprocessError(f"{where}: {key}[{n}] has no 'content' string")
    return value


def _reward(record: dict, key: str, where: str) -> float:
    if key not in record:
        raise PreprocessError(f"{where}: missing reward key {key!r} (has {sorted(record)})")
    value = record[key]
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    raise PreprocessError(
        f"{where}: reward key {key!r} must be true/false or a finite number, got {value!r}"
    )


def encode_record(encoder: ChatEncoder, path: str, number: int, line: bytes) -> Encoded:
    where = location(path, number)
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreprocessError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise PreprocessError(f"{where}: expected a JSON object, got {type(record).__name__}")
    options = encoder.options
    prompt = []
    if options.prompt_key is not None:
        if options.prompt_key not in record:
            raise PreprocessError(f"{where}: missing key {options.prompt_key!r}")
        prompt = _messages(record[options.prompt_key], options.prompt_key, where)
    encoded = Encoded([], [], None)
    for key in options.keys:
        if key not in record:
            raise PreprocessError(f"{where}: missing key {key!r} (has {sorted(record)})")
        tokens, labels = encoder.encode(prompt + _messages(record[key], key, where), where)
        encoded.tokens.append(tokens)
        encoded.labels.append(labels)
    if options.reward_key is not None:
        encoded.reward = _reward(record, options.reward_key, where)
    return encoded


# -- workers -------------------------------------------------------------------------------------

_encoder: ChatEncoder | None = None


def init_worker(options: ChatOptions, encoder: ChatEncoder | None = None) -> None:
    global _encoder
    _encoder = encoder or ChatEncoder(options)


def encode_task(task: Task) -> tuple[int, int, list[Encoded]]:
    """(records, input bytes, encoded records) of one batch of lines."""
    assert _encoder is not None, "init_worker was not called"
    path, lines, size = task
    return len(lines), size, [encode_record(_encoder, path, n, line) for n, line in lines]


# -- output --------------------------------------------------------------------------------------


@dataclass
class Stats:
    records: int = 0
    input_bytes: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)


class Outputs:
    """The builders of every output dataset; all appear under their final names, or none."""

    def __init__(self, prefix: str, options: ChatOptions, vocab_size: int) -> None:
        self.prefixes: list[str] = []
        self.builders: list[MMapIndexedDatasetBuilder] = []
        self.finished: list[str] = []
        os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
        for key in options.keys:
            self._add(output_prefix(prefix, key), best_dtype(vocab_size))
            if not options.no_mask:
                self._add(output_prefix(prefix, f"{key}_label"), np.int32)
            if options.reward_key is not None:
                self._add(output_prefix(prefix, f"{key}_reward"), np.float32)

    def _add(self, prefix: str, dtype: type[np.generic]) -> None:
        self.prefixes.append(prefix)
        self.builders.append(MMapIndexedDatasetBuilder(data_file_path(prefix), dtype))

    def add(self, record: Encoded) -> None:
        """One document in each dataset, in the order the builders were made."""
        arrays: list[np.ndarray] = []
        for tokens, labels in zip(record.tokens, record.labels):
            arrays.append(tokens)
            if labels is not None:
                arrays.append(labels)
            if record.reward is not None:
                arrays.append(np.asarray([record.reward], dtype=np.float32))
        for builder, array in zip(self.builders, arrays, strict=True):
            builder.add_item(array)
            builder.end_document()

    def finalize(self) -> None:
        for builder, prefix in zip(self.builders, self.prefixes):
            builder.finalize(index_file_path(prefix))
            self.finished.append(prefix)

    def abort(self) -> None:
        for builder in self.builders:
            builder.abort()
        # A later dataset failed to finalize: its finished siblings must not stay behind alone.
        for prefix in self.finished:
            for path in (index_file_path(prefix), data_file_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)


def chat_options(args: argparse.Namespace) -> ChatOptions:
    return ChatOptions(
        tokenizer_path=tokenizer_folder(args.tokenizer_path),
        keys=tuple(args.jsonl_keys),
        prompt_key=args.prompt_key,
        generation_role=args.generation_role,
        only_last_turn=args.only_last_turn,
        no_mask=args.no_mask,
        append_eod=args.append_eod,
        reward_key=args.reward_key,
        trust_remote_code=args.trust_remote_code,
    )


def preprocess(args: argparse.Namespace) -> Stats:
    """Tokenize `args.input` into the datasets described in the module docstring."""
    options = chat_options(args)
    paths = resolve_inputs(args.input, options.keys)
    for path in paths:
        if not path.endswith(JSONL_SUFFIXES):
            raise PreprocessError(f"{path}: chat data must be jsonl ({', '.join(JSONL_SUFFIXES)})")
    # Loaded before any output file is opened, so a bad tokenizer leaves nothing behind.
    encoder = ChatEncoder(options)
    stats = Stats(tokens=dict.fromkeys(options.keys, 0), labelled=dict.fromkeys(options.keys, 0))
    outputs = Outputs(args.output_prefix, options, len(encoder.tokenizer))
    start = time.perf_counter()
    try:
        bar = tqdm(total=args.num_docs, unit="doc", file=sys.stderr, miniters=args.log_interval)
        with bar:
            tasks = make_tasks(paths, options.keys)
            # One process reuses the encoder loaded above; workers load their own.
            init_args = (options,) if args.workers > 1 else (options, encoder)
            stream = ordered_map(encode_task, tasks, args.workers, init_worker, init_args)
            for records, size, encoded in stream:
                for record in encoded:
                    outputs.add(record)
                    for key, tokens, labels in zip(options.keys, record.tokens, record.labels):
                        stats.tokens[key] += len(tokens)
                        labelled = tokens if labels is None else labels[labels >= 0]
                        stats.labelled[key] += len(labelled)
                stats.records += records
                stats.input_bytes += size
                elapsed = max(time.perf_counter() - start, 1e-9)
                total = sum(stats.tokens.values())
                bar.set_postfix_str(f"{total / elapsed:,.0f} tokens/s", refresh=False)
                bar.update(records)
        if not stats.records:
            raise PreprocessError(f"{', '.join(paths)}: no records")
        outputs.finalize()
    except BaseException:
        outputs.abort()
        raise
    return stats


def summary(args: argparse.Namespace, stats: Stats) -> str:
    lines = [f"read {stats.records} records ({stats.input_bytes:,} bytes)"]
    outputs = {}
    for key in args.jsonl_keys:
        names = [key] + ([] if args.no_mask else [f"{key}_label"])
        names += [] if args.reward_key is None else [f"{key}_reward"]
        outputs[key] = [output_prefix(args.output_prefix, name) for name in names]
        lines.append(
            f"{key}: {stats.tokens[key]:,} tokens, {stats.labelled[key]:,} labelled -> "
            + ", ".join(f"{prefix}.bin/.idx" for prefix in outputs[key])
        )
    if args.pairwise:
        lines.append("config (dataset_impl: pairwise, train_impl: dpo), and likewise valid/test:")
        for side, key in zip(("pos", "neg"), args.jsonl_keys):
            lines.append(f"  {side}_train_data_paths: [{outputs[key][0]}]")
            if not args.no_mask:
                lines.append(f"  {side}_train_label_data_paths: [{outputs[key][1]}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(None if argv is None else list(argv))

    def work() -> int | None:
        stats = preprocess(args)
        print(summary(args, stats))
        return 0

    return exit_status(work, (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
