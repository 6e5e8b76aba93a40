"""One transformer block: pre-norm attention and MLP, with sequential or parallel residuals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.attention import SelfAttention
from megatron.model.config import ModelConfig
from megatron.model.init_methods import build_init_method
from megatron.model.kv_cache import KVCache
from megatron.model.mlp import MLP
from megatron.model.norms import build_norm
from megatron.mpu.random import init_rng


class TransformerLayer(nn.Module):
    """Block number ``layer_number`` (0-based).

    ``gpt_j_residual``: x + attn(ln1(x)) + mlp(ln2(x)); with ``gpt_j_tied`` the MLP reads ln1(x)
    and the second norm does not exist. Otherwise: h = x + attn(ln1(x)); h + mlp(ln2(h)).
    """

    def __init__(self, config: ModelConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.parallel_residual = config.gpt_j_residual
        self.hidden_dropout = config.hidden_dropout
        # Stream 0 is the embedding; block i draws its weights from stream i + 1.
        with init_rng(config.seed, layer_number + 1):
            init_method = build_init_method(config, "init_method")
            output_init_method = build_init_method(config, "output_layer_init_method")
            self.input_layernorm = build_norm(config)
            self.attention = SelfAttention(config, init_method, output_init_method, layer_number)
            tied = config.gpt_j_residual and config.gpt_j_tied
            self.post_attention_layernorm = None if tied else build_norm(config)
            self.mlp = MLP(config, init_method, output_init_method)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.hidden_dropout, self.training)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(x)
        attn = self._dropout(self.attention(normed, position_ids, attention_mask, kv_cache))
        if self.parallel_residual:
            mlp_in = (
                normed
                if self.post_attention_layernorm is None
                else self.post_attention_layernorm(x)
            )
            return x + attn + self._dropout(self.mlp(mlp_in))
        h = x + attn
        return h + self._dropout(self.mlp(self.post_attention_layernorm(h)))
