"""Positional information: rotary embeddings (applied to queries and keys) and learned
absolute positions (added to the token embeddings)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.mpu.layers import InitMethod, partitioned_parameter

POS_EMB_CHOICES = ("rotary", "learned", "none")


def pos_emb_kind(args: Any) -> str:
    if args.pos_emb not in POS_EMB_CHOICES:
        raise ValueError(
            f"pos_emb: unsupported {args.pos_emb!r}; expected one of {POS_EMB_CHOICES}"
        )
    return args.pos_emb


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GPT-NeoX convention: the rotated pairs are (i, i + d/2), not adjacent channels.
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first ``dim`` channels of each head."""

    def __init__(self, dim: int, base: float, max_seq_len: int) -> None:
        super().__init__()
        if dim <= 0 or dim % 2 != 0:
            raise ValueError(
                f"rotary_pct gives {dim} rotary channels per head; expected a positive even number"
            )
        self.dim = dim
        self.max_seq_len = max_seq_len
        # Plain attributes, not buffers: they stay fp32 when the model is cast to bf16/fp16.
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return torch.cat((freqs, freqs), dim=-1)

    def _cached_cos_sin(
        self, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        if cache is None or cache[0].device != device or cache[0].size(0) < length:
            angles = self._angles(torch.arange(max(length, self.max_seq_len), device=device))
            cache = self._cache = (angles.cos(), angles.sin())
        return cache[0][:length], cache[1][:length]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q, k [b, heads, s, head_dim]; ``position_ids`` [b, s] default to 0..s-1."""
        if position_ids is None:
            cos, sin = self._cached_cos_sin(q.size(2), q.device)
        else:
            angles = self._angles(position_ids).unsqueeze(1)  # broadcast over heads
            cos, sin = angles.cos(), angles.sin()
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class LearnedPositionEmbedding(nn.Module):
    """Absolute positions 0..max_positions-1, replicated on every tensor-parallel rank."""

    def __init__(
        self,
        max_positions: int,
        hidden_size: int,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.weight = partitioned_parameter(
            (max_positions, hidden_size), None, init_method, params_dtype
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(position_ids, self.weight)
