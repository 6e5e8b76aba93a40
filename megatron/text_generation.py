"""Batched sampling from a trained model, with a KV cache.

Prompts of different lengths share a batch by left padding: every row's newest token sits in the
last column, padded keys are masked out and each row's position ids start at 0 on its first real
token, so a row's continuation does not depend on what else is in the batch. With a KV cache the
prompt is run once (prefill) and every later step feeds only the newest token; `use_cache=False`
recomputes the whole context each step (NeoX's `recompute`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from megatron.model.kv_cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the `top_k` largest (0 = off) and outside the nucleus
    (0 or 1 = off): the most likely tokens up to and including the first one at which their
    cumulative probability exceeds `top_p`, as in NeoX."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already exceed top_p.
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[b, padded_vocab] logits -> [b] token ids. temperature, top_k and top_p all 0 is greedy."""
    logits = logits[:, :vocab_size].float()  # padded vocabulary entries are never sampled
    if temperature == 0 and top_k == 0 and top_p == 0:
        return logits.argmax(dim=-1)
    if temperature > 0:
        logits = logits / temperature
    probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def stop_string_check(
    detokenize: Callable[[list[int]], str], stops: Sequence[str]
) -> Callable[[list[int]], bool] | None:
    """generate_batch's `stop_when` for stop strings (None without any): true once the decoded
    continuation contains one (a string may span several tokens)."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    return lambda tokens: any(s in detokenize(tokens) for s in stops)


@dataclass
class Completion:
    """One prompt's continuation. `finished`: it ended with a stop token (not included in
    `tokens`) rather than by reaching maximum_tokens or seq_length."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    logits: list[list[float]] | None = None  # with return_logits: one row per generated token


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, longest] token ids and a bool mask of the real (non-pad) entries."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), longest), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(list(prompt), device=device)
        real[row, longest - len(prompt) :] = True
    return tokens, real


def prefill_mask(real: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s]: causal, never onto padding; a pad query sees itself so no softmax row is
    empty (an all-masked row would give NaN, which 0-weights do not cancel)."""
    s = real.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(s, dtype=torch.bool, device=real.device)
    return ((causal & real[:, None, :]) | eye)[:, None]


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    maximum_tokens: int,
    seq_length: int,
    vocab_size: int,
    stop_tokens: Collection[int] = (),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    use_cache: bool = True,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    stop_when: Callable[[list[int]], bool] | None = None,
) -> list[Completion]:
    """Continue each prompt by up to `maximum_tokens` tokens, all rows in one batch.

    A row stops at its first token in `stop_tokens`, after `maximum_tokens` tokens, when
    `stop_when(tokens so far)` is true (a stop string decoded; the tokens are kept), or when
    prompt + continuation would exceed `seq_length`. Prompts must be non-empty and shorter than
    `seq_length`.
    """
    for row, prompt in enumerate(prompts):
        if not 0 < len(prompt) < seq_length:
            raise ValueError(
                f"prompt {row} has {len(prompt)} tokens; expected 1 to seq_length - 1 "
                f"({seq_length - 1})"
            )
    stop_tokens = set(stop_tokens)
    device = next(model.parameters()).device
    tokens, real = left_pad(prompts, pad_id, device)
    batch, context = tokens.shape
    budgets = [min(maximum_tokens, seq_length - len(p)) for p in prompts]
    steps = max(budgets)
    padded = not bool(real.all())
    # Position of each row's newest token: its real-token count - 1.
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    mask = prefill_mask(real) if padded else None
    cache = KVCache(context + steps) if use_cache else None

    def forward(ids: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
        """The newest position's logits [b, padded_vocab]."""
        pos = pos if padded else None  # unpadded rows take the model's default positions
        return model(ids, pos, attn, kv_cache=cache, logits_to_keep=1)[:, -1]

    results = [Completion(logits=[] if return_logits else None) for _ in prompts]
    active = [True] * batch
    logits = forward(tokens, positions, mask)
    for _ in range(steps):
        next_tokens = sample_next_token(logits, temperature, top_k, top_p, vocab_size, generator)
        for row, token in enumerate(next_tokens.tolist()):
            result = results[row]
            if not active[row]:
                continue
            if token in stop_tokens:
                result.finished, active[row] = True, False
                continue
            result.tokens.append(token)
            if result.logits is not None:
                result.logits.append(logits[row, :vocab_size].float().tolist())
            if stop_when is not None and stop_when(result.tokens):
                result.finished, active[row] = True, False
                continue
            active[row] = len(result.tokens) < budgets[row]
        if not any(active):
            break
        real = torch.cat([real, real.new_ones(batch, 1)], dim=1)
        # A row past its budget keeps running (its output is ignored) until the batch ends;
        # clamping keeps its positions inside the model's range.
        new_positions = (positions[:, -1:] + 1).clamp(max=seq_length - 1)
        if cache is not None:  # feed only the newest token; the cache holds the rest
            ids, positions = next_tokens[:, None], new_positions
            mask = real[:, None, None, :] if padded else None
        else:
            ids = tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            positions = torch.cat([positions, new_positions], dim=1)
            mask = prefill_mask(real) if padded else None
        logits = forward(ids, positions, mask)
    return results
