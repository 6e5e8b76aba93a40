"""From a [b, s + 1] sample to what the model and the loss need (NeoX's get_batch semantics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LTORBatch:
    """Left-to-right language-modelling inputs.

    tokens, labels, loss_mask, position_ids: [b, s]; attention_mask: boolean [b, 1, s, s], True
    where a query may attend to a key, or None for plain causal attention.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] index of the document each position belongs to; an EOD token ends its document."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=1) - is_eod


def get_ltor_batch(
    text: torch.Tensor,
    eod: int,
    label: torch.Tensor | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
) -> LTORBatch:
    """Split `text` into inputs and next-token targets.

    `label` ([b, s + 1], optional) replaces the targets; entries < 0 (-100) carry no loss.
    Negative `text` entries are padding (NeoX pads whole-document samples with -100): they carry
    no loss either and enter the model as token 0.
    `eod_mask_loss` drops the loss where the *input* token is EOD (as NeoX does).
    `reset_position_ids` restarts positions after each EOD; `reset_attention_mask` stops tokens
    from attending across documents packed into one sample (a block-causal mask).
    """
    tokens = text[:, :-1].clamp(min=0)
    targets = text[:, 1:] if label is None else label[:, 1:]
    loss_mask = targets >= 0
    labels = torch.where(loss_mask, targets, torch.zeros_like(targets)).contiguous()
    loss_mask = loss_mask.float()
    if eod_mask_loss:
        loss_mask = loss_mask * (tokens != eod).float()
    position_ids = attention_mask = None
    if reset_position_ids or reset_attention_mask:
        docs = document_ids(tokens, eod)
        if reset_position_ids:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            # Each position minus the position where its document starts.
            starts = torch.zeros_like(tokens).scatter_reduce(
                1, docs, positions, reduce="amin", include_self=False
            )
            position_ids = positions - starts.gather(1, docs)
        if reset_attention_mask:
            s = tokens.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
            attention_mask = (docs[:, :, None] == docs[:, None, :]) & causal
            attention_mask = attention_mask[:, None]
    return LTORBatch(tokens, labels, loss_mask, attention_mask, position_ids)
