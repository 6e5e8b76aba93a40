"""Causal self-attention with a fused, tensor-parallel QKV projection."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.positional import RotaryEmbedding, pos_emb_kind
from megatron.mpu.initialize import get_tensor_model_parallel_world_size
from megatron.mpu.layers import ColumnParallelLinear, InitMethod, RowParallelLinear, divide


class SelfAttention(nn.Module):
    """Multi-head attention over [b, s, h] activations.

    The QKV output is laid out per head as [heads, 3, head_dim] (as in GPT-NeoX and Hugging
    Face's GPTNeoXAttention), so splitting it by output rows gives each tensor-parallel rank
    whole heads.
    """

    def __init__(self, args: Any, init_method: InitMethod, output_init_method: InitMethod) -> None:
        super().__init__()
        heads, hidden = args.num_attention_heads, args.hidden_size
        if args.num_kv_heads is not None and args.num_kv_heads != heads:
            raise ValueError(
                f"num_kv_heads={args.num_kv_heads} differs from num_attention_heads={heads}: "
                "grouped-query attention is not supported yet (GQA comes with the Llama "
                "architecture issue)"
            )
        if hidden % heads != 0:
            raise ValueError(
                f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})"
            )
        self.head_dim = hidden // heads
        self.local_heads = divide(
            heads, get_tensor_model_parallel_world_size(), "num_attention_heads"
        )
        self.dropout_p = args.attention_dropout
        self.query_key_value = ColumnParallelLinear(
            hidden,
            3 * hidden,
            init_method=init_method,
            bias=args.use_bias_in_attn_linear,
            gather_output=False,
            params_dtype=args.params_dtype,
        )
        self.dense = RowParallelLinear(
            hidden,
            hidden,
            init_method=output_init_method,
            bias=args.use_bias_in_attn_linear,
            input_is_parallel=True,
            params_dtype=args.params_dtype,
        )
        self.rotary = None
        if pos_emb_kind(args) == "rotary":
            self.rotary = RotaryEmbedding(
                int(self.head_dim * args.rotary_pct),
                args.rotary_emb_base,
                args.max_position_embeddings,
            )

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask``: boolean, True where a query may attend to a key, broadcastable
        to [b, heads, s, s]; None means causal."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, heads, s, head_dim]
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise ValueError(
                f"attention_mask must be boolean (True = may attend), got {attention_mask.dtype}"
            )
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=attention_mask is None,
        )
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
