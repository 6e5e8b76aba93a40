"""How one Strata tensor corresponds to one or more Hugging Face tensors.

Each layout converts in both directions, so an architecture's map is declared once and both
converters read it. Shapes follow docs/interfaces.md "Canonical weight layouts".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dims:
    """The sizes a layout needs: attention heads and vocabulary rows on each side."""

    heads: int
    kv_heads: int
    head_dim: int
    hf_vocab: int  # rows of the Hugging Face embedding / head
    padded_vocab: int  # rows of Strata's embedding / head (>= hf_vocab)


class Layout:
    """Identity: the same tensor under another name."""

    def to_strata(self, parts: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        (tensor,) = parts
        return tensor

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        return [tensor]


class VocabRows(Layout):
    """Embedding / output rows: zero rows pad Strata's copy to the padded vocabulary."""

    def to_strata(self, parts: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        (tensor,) = parts
        extra = dims.padded_vocab - tensor.shape[0]
        if extra < 0:
            raise ValueError(
                f"{tensor.shape[0]} vocabulary rows do not fit the padded vocabulary "
                f"({dims.padded_vocab})"
            )
        return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        if tensor.shape[0] < dims.hf_vocab:
            raise ValueError(
                f"{tensor.shape[0]} vocabulary rows are fewer than the {dims.hf_vocab} exported"
            )
        return [tensor[: dims.hf_vocab]]


class GroupedQKV(Layout):
    """Separate q, k, v projections <-> Strata's fused rows grouped per key/value head:
    [kv_heads, heads_per_kv + 2, head_dim] (the group's queries, then its key, then its value).
    Works for weights [rows, in] and biases [rows]."""

    def to_strata(self, parts: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        q, k, v = parts
        group, rest = dims.heads // dims.kv_heads, q.shape[1:]
        q = q.reshape(dims.kv_heads, group, dims.head_dim, *rest)
        k = k.reshape(dims.kv_heads, 1, dims.head_dim, *rest)
        v = v.reshape(dims.kv_heads, 1, dims.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        group, rest = dims.heads // dims.kv_heads, tensor.shape[1:]
        grouped = tensor.reshape(dims.kv_heads, group + 2, dims.head_dim, *rest)
        q, k, v = grouped.split([group, 1, 1], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


class GateUp(Layout):
    """Separate gate and up projections <-> Strata's gated MLP input rows [gate; up]."""

    def to_strata(self, parts: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        gate, up = parts
        return torch.cat([gate, up], dim=0)

    def to_hf(self, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        return [half.contiguous() for half in tensor.chunk(2, dim=0)]


IDENTITY = Layout()
VOCAB_ROWS = VocabRows()
GROUPED_QKV = GroupedQKV()
GATE_UP = GateUp()
