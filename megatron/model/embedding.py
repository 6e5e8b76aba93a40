"""Token (and optional learned position) embeddings, the first layer of the model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.init_methods import build_init_method
from megatron.model.positional import LearnedPositionEmbedding, pos_emb_kind
from megatron.mpu.layers import VocabParallelEmbedding
from megatron.mpu.random import init_rng

EMBEDDING_INIT_STREAM = 0


class EmbeddingLayer(nn.Module):
    def __init__(self, args: Any) -> None:
        super().__init__()
        self.hidden_dropout = args.hidden_dropout
        with init_rng(args.seed, EMBEDDING_INIT_STREAM):
            init_method = build_init_method(args, "init_method")
            self.word_embeddings = VocabParallelEmbedding(
                args.padded_vocab_size,
                args.hidden_size,
                init_method=init_method,
                params_dtype=args.params_dtype,
            )
            self.position_embeddings = None
            if pos_emb_kind(args) == "learned":
                self.position_embeddings = LearnedPositionEmbedding(
                    args.max_position_embeddings, args.hidden_size, init_method, args.params_dtype
                )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[b, s] token ids (and [b, s] positions, default 0..s-1) -> [b, s, h]."""
        h = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.size(1), device=input_ids.device)
            h = h + self.position_embeddings(position_ids)
        return F.dropout(h, self.hidden_dropout, self.training)
