"""Sampling from a trained model (plain: the whole context is recomputed each token)."""

from __future__ import annotations

import torch


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, vocab_size: int
) -> torch.Tensor:
    """[b, padded_vocab] logits -> [b] token ids. temperature, top_k and top_p all 0 is greedy."""
    logits = logits[:, :vocab_size].float()  # padded vocabulary entries are never sampled
    if temperature == 0 and top_k == 0 and top_p == 0:
        return logits.argmax(dim=-1)
    logits = logits / (temperature or 1.0)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the first token past top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model,
    prompt: list[int],
    maximum_tokens: int,
    seq_length: int,
    vocab_size: int,
    eod: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
) -> list[int]:
    """Continue `prompt` by up to `maximum_tokens` tokens, stopping at `eod`."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    generated: list[int] = []
    for _ in range(maximum_tokens):
        logits = model(tokens[:, -seq_length:])[:, -1]
        token = sample_next_token(logits, temperature, top_k, top_p, vocab_size)
        if eod is not None and token.item() == eod:
            break
        generated.append(token.item())
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return generated
