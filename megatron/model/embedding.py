"""Token (and optional learned position) embeddings, the first layer of the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.config import ModelConfig
from megatron.model.init_methods import build_init_method
from megatron.model.mup import mark_width_independent
from megatron.model.positional import build_embedding_positions
from megatron.mpu.layers import VocabParallelEmbedding
from megatron.mpu.random import init_rng

EMBEDDING_INIT_STREAM = 0


class EmbeddingLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        # muP's embedding multiplier (tuned on the base model, kept as the width grows).
        self.output_mult = config.mup_embedding_mult if config.use_mup else 1.0
        with init_rng(config.seed, EMBEDDING_INIT_STREAM):
            init_method = build_init_method(config, "init_method", role="input")
            self.word_embeddings = VocabParallelEmbedding(
                config.padded_vocab_size,
                config.hidden_size,
                init_method=init_method,
                params_dtype=config.params_dtype,
            )
            # Learned or sinusoidal positions (pos_emb registry); None for the other kinds.
            self.position_embeddings = build_embedding_positions(config, init_method)

        for param in self.parameters():  # input weights: muP keeps their learning rate
            mark_width_independent(param)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[b, s] token ids (and [b, s] positions, default 0..s-1) -> [b, s, h]."""
        h = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.size(1), device=input_ids.device)
            h = h + self.position_embeddings(position_ids)
        if self.output_mult != 1.0:
            h = h * self.output_mult
        return F.dropout(h, self.hidden_dropout, self.training)
