"""Causal self-attention: fused tensor-parallel QKV projection, grouped-query heads, optional
QK norm, positional embeddings and a KV cache, with the softmax core from a backend."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megatron.model.attention_backends import AttentionOptions, build_attention_backend
from megatron.model.config import ModelConfig
from megatron.model.kv_cache import KVCache
from megatron.model.norms import build_norm
from megatron.model.positional import build_alibi_slopes, build_query_key_positions
from megatron.mpu.heads import partition_heads
from megatron.mpu.layers import ColumnParallelLinear, InitMethod, RowParallelLinear
from megatron.mpu.mappings import gather_from_tensor_parallel_subgroup
from megatron.mpu.random import get_rng_tracker


def head_counts(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim), checking that they divide evenly (of a
    ModelConfig, or of a NeoX config: the same keys)."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv_heads = config.num_kv_heads or heads
    if hidden % heads:
        raise ValueError(
            f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})"
        )
    if kv_heads > heads or heads % kv_heads:
        raise ValueError(
            f"num_attention_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})"
        )
    return heads, kv_heads, hidden // heads


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """1/sqrt(d); muP uses 1/d (divided by mup_attn_temp) so logits stay O(1) as width grows."""
    if config.use_mup:
        return 1.0 / (head_dim * config.mup_attn_temp)
    return 1.0 / math.sqrt(head_dim)


class SelfAttention(nn.Module):
    """Attention over [b, s, h] activations for block ``layer_number`` (0-based).

    The QKV output rows are grouped per key/value head: [kv_heads, heads_per_kv + 2, head_dim]
    (the group's query heads, then its key, then its value). With as many key/value heads as
    query heads this is GPT-NeoX's per-head [heads, 3, head_dim] layout, and splitting the rows
    across tensor-parallel ranks gives each rank whole groups. With fewer key/value heads than
    ranks, the ranks sharing a head each hold part of its channels and gather the rest (a
    reduce-scatter of the gradient backward), so every weight still lives on one rank only.
    """

    def __init__(
        self,
        config: ModelConfig,
        init_method: InitMethod,
        output_init_method: InitMethod,
        layer_number: int = 0,
    ) -> None:
        super().__init__()
        heads, kv_heads, head_dim = head_counts(config)
        partition = partition_heads(heads, kv_heads, head_dim)  # this tensor-parallel rank's share
        self.kv_replicas = partition.kv_replicas
        self.layer_number = layer_number
        self.head_dim = head_dim
        self.group = heads // kv_heads  # query heads per key/value head
        self.local_kv_heads = partition.kv_heads
        self.local_heads = partition.heads
        self.dropout_p = config.attention_dropout
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size,
            (heads + 2 * kv_heads) * head_dim,
            init_method=init_method,
            bias=config.use_bias_in_attn_linear,
            gather_output=False,
            params_dtype=config.params_dtype,
            row_order=partition.row_order,
        )
        self.dense = RowParallelLinear(
            heads * head_dim,
            config.hidden_size,
            init_method=output_init_method,
            bias=config.use_bias_in_attn_linear,
            input_is_parallel=True,
            params_dtype=config.params_dtype,
        )
        # QK norm (Dehghani et al. 2023): one norm over each head's channels, shared by heads.
        self.q_norm = self.k_norm = None
        if config.use_qk_layernorm:
            self.q_norm = build_norm(config, head_dim)
            self.k_norm = build_norm(config, head_dim)
        # Rotary (the pos_emb kind's query/key hook), applied before the KV cache; or None.
        self.qk_positional = build_query_key_positions(config, head_dim)
        slopes = build_alibi_slopes(config)
        if slopes is not None:
            slopes = slopes[partition.first_head : partition.first_head + self.local_heads]
        self.core = build_attention_backend(
            config.attention_backends[layer_number],
            AttentionOptions(
                num_heads=self.local_heads,
                num_kv_heads=self.local_kv_heads,
                head_dim=head_dim,
                scale=softmax_scale(config, head_dim),
                window=config.sliding_window_width,
                alibi_slopes=slopes,
                dropout=config.attention_dropout,
            ),
        )

    def _query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's q [b, s, heads, d] and k, v [b, s, kv_heads, d]."""
        qkv = self.query_key_value(x)  # the whole sequence, also under sequence_parallel
        b, s, _ = qkv.shape
        if self.kv_replicas == 1:
            qkv = qkv.view(b, s, self.local_kv_heads, self.group + 2, self.head_dim)
            q = qkv[:, :, :, : self.group].reshape(b, s, self.local_heads, self.head_dim)
            return q, qkv[:, :, :, -2], qkv[:, :, :, -1]
        q_rows = self.local_heads * self.head_dim
        q = qkv[..., :q_rows].view(b, s, self.local_heads, self.head_dim)
        # This rank's channels of the shared key and value, completed by the ranks sharing them.
        parts = qkv[..., q_rows:].unflatten(-1, (2, self.head_dim // self.kv_replicas))
        kv = gather_from_tensor_parallel_subgroup(parts, self.kv_replicas)
        return q, kv[:, :, :1], kv[:, :, 1:]

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``attention_mask``: boolean, True where a query may attend to a key, broadcastable
        to [b, 1, s, s] ([b, 1, s, cache.length + s] with a cache); attention is always causal
        and the mask restricts it further (documents, padding). ``position_ids`` [b or 1, s]
        default to 0..s-1, or to cache.length + 0..s-1 with ``kv_cache``."""
        q, k, v = (t.transpose(1, 2) for t in self._query_key_value(x))
        b, s = q.shape[0], q.shape[2]  # the whole sequence, also under sequence_parallel
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if kv_cache is not None and position_ids is None:
            position_ids = kv_cache.positions(s, x.device)
        if self.qk_positional is not None:
            q, k = self.qk_positional(q, k, position_ids)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0:
            # This rank's heads only: the tracker's per-tensor-parallel-rank stream.
            with get_rng_tracker().fork():
                out = self.core(q, k, v, attention_mask, dropout)
        else:
            out = self.core(q, k, v, attention_mask, dropout)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
