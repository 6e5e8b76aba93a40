"""Causal self-attention: fused tensor-parallel QKV projection, grouped-query heads, optional
QK norm, positional embeddings and a KV cache, with the softmax core from a backend."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megatron.model.attention_backends import (
    AttentionOptions,
    build_attention_backend,
    layer_backend_name,
)
from megatron.model.kv_cache import KVCache
from megatron.model.norms import build_norm
from megatron.model.positional import build_alibi_slopes, build_query_key_positions
from megatron.mpu.initialize import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    sequence_parallel_is_on,
)
from megatron.mpu.layers import ColumnParallelLinear, InitMethod, RowParallelLinear
from megatron.mpu.mappings import reduce_from_tensor_model_parallel_region
from megatron.mpu.random import get_rng_tracker


class _Resized:
    """``args`` seen with another ``hidden_size``, to build a norm of one head's width."""

    def __init__(self, args: Any, hidden_size: int) -> None:
        self._args = args
        self.hidden_size = hidden_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


def head_counts(args: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim), checking that they divide evenly."""
    heads, hidden = args.num_attention_heads, args.hidden_size
    kv_heads = args.num_kv_heads or heads
    if hidden % heads:
        raise ValueError(
            f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})"
        )
    if kv_heads > heads or heads % kv_heads:
        raise ValueError(
            f"num_attention_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})"
        )
    return heads, kv_heads, hidden // heads


def softmax_scale(args: Any, head_dim: int) -> float:
    """1/sqrt(d); muP uses 1/d (divided by mup_attn_temp) so logits stay O(1) as width grows."""
    if args.use_mup:
        return 1.0 / (head_dim * args.mup_attn_temp)
    return 1.0 / math.sqrt(head_dim)


class SelfAttention(nn.Module):
    """Attention over [b, s, h] activations for block ``layer_number`` (0-based).

    The QKV output rows are grouped per key/value head: [kv_heads, heads_per_kv + 2, head_dim]
    (the group's query heads, then its key, then its value). With as many key/value heads as
    query heads this is GPT-NeoX's per-head [heads, 3, head_dim] layout, and splitting the rows
    across tensor-parallel ranks gives each rank whole groups.
    """

    def __init__(
        self,
        args: Any,
        init_method: InitMethod,
        output_init_method: InitMethod,
        layer_number: int = 0,
    ) -> None:
        super().__init__()
        heads, kv_heads, head_dim = head_counts(args)
        tp = get_tensor_model_parallel_world_size()
        if kv_heads % tp:
            raise ValueError(
                f"num_kv_heads ({kv_heads}) must be divisible by the tensor-parallel size "
                f"({tp}): each rank holds whole key/value groups (replicating key/value heads "
                "when num_kv_heads < tensor-parallel size is not supported yet, issue 5)"
            )
        self.layer_number = layer_number
        self.head_dim = head_dim
        self.group = heads // kv_heads  # query heads per key/value head
        self.local_kv_heads = kv_heads // tp
        self.local_heads = self.local_kv_heads * self.group
        self.dropout_p = args.attention_dropout
        self.query_key_value = ColumnParallelLinear(
            args.hidden_size,
            (heads + 2 * kv_heads) * head_dim,
            init_method=init_method,
            bias=args.use_bias_in_attn_linear,
            gather_output=False,
            params_dtype=args.params_dtype,
            sequence_parallel=sequence_parallel_is_on(args),
        )
        self.dense = RowParallelLinear(
            heads * head_dim,
            args.hidden_size,
            init_method=output_init_method,
            bias=args.use_bias_in_attn_linear,
            input_is_parallel=True,
            params_dtype=args.params_dtype,
            sequence_parallel=sequence_parallel_is_on(args),
        )
        # QK norm (Dehghani et al. 2023): one norm over each head's channels, shared by heads.
        self.q_norm = self.k_norm = None
        if args.use_qk_layernorm:
            self.q_norm = build_norm(_Resized(args, head_dim))
            self.k_norm = build_norm(_Resized(args, head_dim))
            if tp > 1:  # every rank holds the weights but sees only its heads: sum the grads
                for param in [*self.q_norm.parameters(), *self.k_norm.parameters()]:
                    param.register_hook(reduce_from_tensor_model_parallel_region)
        # Rotary (the pos_emb kind's query/key hook), applied before the KV cache; or None.
        self.qk_positional = build_query_key_positions(args, head_dim)
        slopes = build_alibi_slopes(args)
        if slopes is not None:
            first = get_tensor_model_parallel_rank() * self.local_heads
            slopes = slopes[first : first + self.local_heads]
        self.core = build_attention_backend(
            layer_backend_name(args, layer_number),
            AttentionOptions(
                num_heads=self.local_heads,
                num_kv_heads=self.local_kv_heads,
                head_dim=head_dim,
                scale=softmax_scale(args, head_dim),
                window=args.sliding_window_width,
                alibi_slopes=slopes,
                dropout=args.attention_dropout,
            ),
        )

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
        qkv = self.query_key_value(x)  # the whole sequence, also under sequence_parallel
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.local_kv_heads, self.group + 2, self.head_dim)
        q = qkv[:, :, :, : self.group].reshape(b, s, self.local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, qkv[:, :, :, -2], qkv[:, :, :, -1]))
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
