"""lm-evaluation-harness's model interface, backed by a Strata model and tokenizer.

Requests that share a context (a multiple-choice question and its answers) are scored in one
row: the context once, then each continuation, which attends to the context and to itself only
(its positions continue the context's), so the context's tokens go through the model once
instead of once per choice. Rows are batched sorted by length (longest first) and left-padded,
so a batch wastes little padding, and only the predicting positions go through the LM head;
results come back in request order. Under data parallelism the harness gives each data-parallel rank its
share of the documents and gathers the per-document metrics through the methods below; the
tensor-parallel ranks of one replica score the same requests together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from megatron import mpu
from megatron.text_generation import (
    generate_batch,
    left_pad,
    prefill_mask,
    stop_string_check,
    truncate_at_stop,
)
from megatron.tokenizer.chat import ChatTemplate

# One scoring request in token ids: (context, continuation).
TokenPair = tuple[list[int], list[int]]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Request indices in batches of `batch_size`, longest first (equal lengths keep order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@dataclass
class SharedContext:
    """One row of a scoring batch: a context and the continuations scored after it. The row
    holds the context, then each continuation but its last token; the context's last position
    predicts every continuation's first token."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # each continuation's request index

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    def tokens(self) -> list[int]:
        return self.context + [t for c in self.continuations for t in c[:-1]]

    def predicting(self) -> int:
        """Positions whose logits are read: the context's last and the continuations'."""
        return len(self) - len(self.context) + 1

    def predictor_rows(self) -> Iterator[list[int]]:
        """Per continuation, its predicting positions among the last `predicting()`."""
        start = 1
        for continuation in self.continuations:
            yield [0, *range(start, start + len(continuation) - 1)]
            start += len(continuation) - 1


def share_contexts(pairs: Sequence[TokenPair], seq_length: int) -> list[SharedContext]:
    """Rows of at most seq_length tokens; requests with the same context share a row."""
    rows: list[SharedContext] = []
    open_rows: dict[tuple[int, ...], SharedContext] = {}
    for index, (context, continuation) in enumerate(pairs):
        row = open_rows.get(tuple(context))
        if row is None or len(row) + len(continuation) - 1 > seq_length:
            row = open_rows[tuple(context)] = SharedContext(context)
            rows.append(row)
        row.continuations.append(continuation)
        row.owners.append(index)
    return rows


def row_layout(
    rows: Sequence[SharedContext], width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, width] positions and segments of left-padded rows: the context is segment 0 at
    positions 0.., continuation k is segment k at positions that follow the context; padding
    is segment -1 at position 0."""
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for index, row in enumerate(rows):
        column = width - len(row)
        positions[index, column : column + len(row.context)] = torch.arange(len(row.context))
        segments[index, column : column + len(row.context)] = 0
        column += len(row.context)
        for k, continuation in enumerate(row.continuations, start=1):
            n = len(continuation) - 1
            positions[index, column : column + n] = torch.arange(n) + len(row.context)
            segments[index, column : column + n] = k
            column += n
    return positions.to(device), segments.to(device)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s]: a query sees the context and its own segment (causality is the model's)."""
    keys, queries = segments[:, None, :], segments[:, :, None]
    return ((keys == 0) | (keys == queries))[:, None]


class StrataLM(TemplateLM):
    """`model`: a GPTModel (this process's shard) in eval mode; `tokenizer`: a Strata tokenizer.
    `seq_length` bounds every forward pass; `batch_size` requests run per forward pass."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        seq_length: int,
        batch_size: int,
        chat_template: ChatTemplate | None = None,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.model, self.strata_tokenizer = model, tokenizer
        self.seq_length, self.batch_size = seq_length, batch_size
        self._chat_template = chat_template
        self._device = next(model.parameters()).device
        self._rank = mpu.get_data_parallel_rank()
        self._world_size = mpu.get_data_parallel_world_size()
        self._group = mpu.get_data_parallel_group() if self._world_size > 1 else None
        self.generator = torch.Generator(self._device).manual_seed(seed)

    # -- tokens ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.strata_tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.seq_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.strata_tokenizer.tokenize(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.strata_tokenizer.detokenize(list(tokens))

    # -- scoring ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _score_batch(self, rows: Sequence[SharedContext]) -> list[list[tuple[float, bool]]]:
        """Per row, per continuation: (sum of its log-probabilities, whether greedy decoding
        gives it)."""
        tokens, real = left_pad([row.tokens() for row in rows], self.eot_token_id, self._device)
        shared = any(len(row.continuations) > 1 for row in rows)
        positions = mask = None
        if shared or not bool(real.all()):
            positions, segments = row_layout(rows, tokens.shape[1], self._device)
            mask = prefill_mask(real) & segment_mask(segments)
        keep = max(row.predicting() for row in rows)
        logits = self.model(tokens, positions, mask, logits_to_keep=keep).float()
        results = []
        for index, row in enumerate(rows):
            predicting = logits[index, keep - row.predicting() :]
            scores = []
            for rows_of, continuation in zip(row.predictor_rows(), row.continuations):
                row_logits = predicting[rows_of]
                target = torch.tensor(continuation, device=row_logits.device)
                logprobs = row_logits.log_softmax(dim=-1)
                total = float(logprobs.gather(-1, target[:, None]).sum())
                greedy = bool((row_logits.argmax(dim=-1) == target).all())
                scores.append((total, greedy))
            results.append(scores)
        return results

    def _fit(self, context: list[int], continuation: list[int]) -> TokenPair:
        """Keep the last seq_length + 1 tokens (the first is only ever input), as the harness's
        Hugging Face backend does."""
        whole = (context + continuation)[-(self.seq_length + 1) :]
        n = min(len(continuation), len(whole) - 1)
        return whole[: len(whole) - n], whole[len(whole) - n :]

    def _score_pairs(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        rows = share_contexts([self._fit(c, x) for c, x in pairs], self.seq_length)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for batch in length_sorted_batches([len(row) for row in rows], self.batch_size):
            for row, scores in zip(
                [rows[i] for i in batch], self._score_batch([rows[i] for i in batch])
            ):
                for owner, result in zip(row.owners, scores):
                    results[owner] = result
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._score_pairs(
            [(context, continuation) for _, context, continuation in requests]
        )
        for (cache_key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over the harness's disjoint rolling windows of
        seq_length tokens (the first conditioned on the end-of-document token)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.seq_length,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score_pairs(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled with do_sample) continuations through the KV cache, cut at the
        request's first stop string and at most max_gen_toks tokens long."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            stops = kwargs.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            max_tokens = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            room = max(1, self.seq_length - max_tokens)
            contexts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            contexts = [c or [self.eot_token_id] for c in contexts]
            for batch in length_sorted_batches([len(c) for c in contexts], self.batch_size):
                completions = generate_batch(
                    self.model,
                    [contexts[i] for i in batch],
                    max_tokens,
                    self.seq_length,
                    self.strata_tokenizer.vocab_size,
                    stop_tokens=(self.eot_token_id,),
                    temperature=temperature,
                    pad_id=self.eot_token_id,
                    generator=self.generator,
                    stop_when=stop_string_check(self.tok_decode, stops),
                )
                for position, completion in zip(batch, completions):
                    text = truncate_at_stop(self.tok_decode(completion.tokens), stops)
                    outputs[indices[position]] = text
                    self.cache_hook.add_partial(
                        "generate_until", requests[indices[position]].args, text
                    )
        return outputs  # type: ignore[return-value]

    # -- chat ------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.strata_tokenizer.name

    def chat_template(self, chat_template: bool | str = False) -> str:
        """The template's source, which the harness records with the results."""
        return self._chat_template.source if self._chat_template is not None else ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self._chat_template is None:
            raise ValueError("eval_apply_chat_template is off: no chat template loaded")
        return self._chat_template.render(chat_history, add_generation_prompt)

    # -- data parallelism: the harness splits documents by rank and gathers through these ---

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self._world_size
        dist.all_gather_object(gathered, obj, group=self._group)
        return gathered if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self._group)
