"""Generate text from a checkpoint, with NeoX's keys:

    python deepy.py generate.py CONFIG.yml load=DIR [text_gen_type=unconditional]
    python deepy.py generate.py CONFIG.yml load=DIR text_gen_type=input-file \
        sample_input_file=prompts.txt sample_output_file=out.jsonl
    python deepy.py generate.py CONFIG.yml load=DIR text_gen_type=interactive

`unconditional` and `input-file` write one JSON object per sample to `sample_output_file`
(`context`, `text`, `length`, `finished`, `message`, `duration_seconds`, and `logits` with
`return_logits`); `interactive` reads one prompt per line from stdin until an empty line or EOF.
Prompts run in batches of `train_micro_batch_size_per_gpu` (one when no batch key is set).
Generation stops at the end-of-document token and at `stop_tokens` (ids, or strings, which are
cut from the text); `apply_chat_template: true` sends each prompt as a user turn through the
tokenizer's chat template.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.checkpoint import resolve_checkpoint
from megatron.entry import run_entry_point
from megatron.inference import load_model
from megatron.initialize import device
from megatron.neox_arguments import ConfigError
from megatron.text_generation import generate_batch, stop_string_check, truncate_at_stop
from megatron.tokenizer.chat import load_chat_template
from megatron.utils import atomic_write_text


def split_stops(stops: list | None, tokenizer: Any) -> tuple[set[int], list[str]]:
    """`stop_tokens` as token ids (ids, and strings that are one token) and the strings that
    span several tokens; the end-of-document token always stops."""
    ids, strings = {tokenizer.eod}, []
    for stop in stops or []:
        if isinstance(stop, bool) or not isinstance(stop, (int, str)) or stop == "":
            raise ConfigError(f"stop_tokens: expected token ids or non-empty strings, got {stop!r}")
        if isinstance(stop, int):
            if not 0 <= stop < tokenizer.vocab_size:
                raise ConfigError(
                    f"stop_tokens: token id {stop} is outside the tokenizer's 0..{tokenizer.vocab_size - 1}"
                )
            ids.add(stop)
            continue
        encoded = tokenizer.tokenize(stop)
        if len(encoded) == 1:
            ids.add(encoded[0])
        else:
            strings.append(stop)
    return ids, strings


class Sampler:
    """Turns prompt strings into NeoX-style result records with one model and tokenizer."""

    def __init__(self, args: Any, model: torch.nn.Module, tokenizer: Any) -> None:
        self.args, self.model, self.tokenizer = args, model, tokenizer
        self.generator = torch.Generator(device()).manual_seed(args.seed)
        self.stop_ids, self.stop_strings = split_stops(args.stop_tokens, tokenizer)
        self.chat = (
            load_chat_template("apply_chat_template", args.tokenizer_type, args.vocab_file)
            if args.apply_chat_template
            else None
        )

    def _context(self, text: str) -> tuple[list[int], str | None]:
        """Token ids of one prompt (an empty prompt is the end-of-document token, as in NeoX;
        with apply_chat_template a user turn), cut to its last tokens when it leaves no room in
        seq_length."""
        if self.chat is not None:
            text = self.chat.render([{"role": "user", "content": text}])
        ids = self.tokenizer.tokenize(text) if text else [self.tokenizer.eod]
        seq, wanted = self.args.seq_length, self.args.maximum_tokens
        if len(ids) < seq:
            return ids, None
        keep = max(1, seq - wanted)
        message = f"context has {len(ids)} tokens, seq_length is {seq}: kept its last {keep} tokens"
        return ids[-keep:], message

    def complete(self, texts: list[str]) -> list[dict[str, Any]]:
        args, records = self.args, []
        batch_size = max(1, args.train_micro_batch_size_per_gpu or 1)
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            began = time.perf_counter()
            contexts = [self._context(text) for text in chunk]
            results = generate_batch(
                self.model,
                [ids for ids, _ in contexts],
                args.maximum_tokens,
                args.seq_length,
                self.tokenizer.vocab_size,
                stop_tokens=self.stop_ids,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                use_cache=not args.recompute,
                pad_id=self.tokenizer.pad,
                generator=self.generator,
                return_logits=args.return_logits,
                stop_when=stop_string_check(self.tokenizer.detokenize, self.stop_strings),
            )
            seconds = time.perf_counter() - began  # the whole batch's time, shared by its rows
            for text, (_, message), result in zip(chunk, contexts, results):
                record = {
                    "context": text,
                    "text": truncate_at_stop(
                        self.tokenizer.detokenize(result.tokens), self.stop_strings
                    ),
                    "length": len(result.tokens),
                    "finished": result.finished,
                    "message": message,
                    "duration_seconds": seconds,
                }
                if result.logits is not None:
                    record["logits"] = result.logits
                records.append(record)
        return records


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _print_record(record: dict[str, Any]) -> None:
    end = "stopped at end of text" if record["finished"] else "length limit reached"
    header = f"--- {record['length']} tokens, {end} ---"
    note = f"\n({record['message']})" if record["message"] else ""
    print(f"{header}\n{record['text']}{note}", flush=True)


def _write_records(path: str, records: list[dict[str, Any]]) -> None:
    """Rank 0 writes the whole JSON-lines file at once (temporary name, then rename)."""
    if not _is_writer():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} samples to {path}", flush=True)


def read_prompts(path: str, prompt_end: str) -> list[str]:
    """Prompts separated by `prompt_end`, stripped, empty ones dropped (as in NeoX)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"sample_input_file: cannot read {path}: {err}") from err
    prompts = [p.strip() for p in text.split(prompt_end)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(
            f"sample_input_file {path} holds no prompts (separated by prompt_end={prompt_end!r})"
        )
    return prompts


def load_sampler(args: Any) -> Sampler:
    model, tokenizer, _ = load_model(args)
    return Sampler(args, model, tokenizer)


def unconditional(args: Any) -> None:
    records = load_sampler(args).complete([""] * args.num_samples)
    if _is_writer():
        for record in records:
            _print_record(record)
    _write_records(args.sample_output_file, records)


def input_file(args: Any) -> None:
    if not args.sample_input_file:
        raise ConfigError("text_gen_type='input-file' needs sample_input_file (a prompts file)")
    prompts = read_prompts(args.sample_input_file, args.prompt_end)  # before the model loads
    _write_records(args.sample_output_file, load_sampler(args).complete(prompts))


def _next_prompt() -> str:
    """Rank 0 reads a line from stdin and shares it; '' means stop (empty line or EOF)."""
    line = ""
    if _is_writer():
        if sys.stdin.isatty():
            print("prompt (empty line to stop)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().rstrip("\n")
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [line]
        dist.broadcast_object_list(shared, src=0)
        line = shared[0]
    return line


def interactive(args: Any) -> None:
    sampler = load_sampler(args)
    while prompt := _next_prompt():
        (record,) = sampler.complete([prompt])
        if _is_writer():
            _print_record(record)


MODES: dict[str, Callable[[Any], None]] = {
    "unconditional": unconditional,
    "input-file": input_file,
    "interactive": interactive,
}


def main(args: Any) -> None:
    if not args.load:
        raise ConfigError("load: generate.py needs a checkpoint directory (load=DIR)")
    if args.text_gen_type not in MODES:
        raise ConfigError(
            f"text_gen_type={args.text_gen_type!r} is not supported yet; "
            f"expected one of {', '.join(MODES)}"
        )
    # A missing or incomplete checkpoint fails before any work.
    resolve_checkpoint(args.load, args.iteration)
    MODES[args.text_gen_type](args)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
