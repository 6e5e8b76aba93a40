"""A pipeline stage run forward-only, for scoring and sampling at pipe_parallel_size >= 2.

Every rank of a pipeline calls ``forward`` with the same arguments, as it would call
``GPTModel``: the first stage embeds the tokens and sends the hidden state on, each stage runs
its blocks (filling its layers' slots of the KV cache), and the last stage's logits are
broadcast back to every stage, so the caller's code (the harness adapter, sampling) runs
unchanged on every rank. Stages run one after another (no micro-batch overlap): a pipeline here
holds a model too large for one device's memory; it does not make evaluation faster.

Parameter names are GPTModel's (``embedding.*``, ``layers.{i}.*``, ``final_norm.*``,
``lm_head.*``), so a layout-free checkpoint loads into a stage as it does into the whole
model. With tied embeddings the last stage holds its own copy of the word embeddings.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron import mpu
from megatron.model.attention_backends import shared_attention_masks
from megatron.model.config import ModelConfig
from megatron.model.embedding import EmbeddingLayer
from megatron.model.gpt_model import FinalNorm, LMHead
from megatron.model.kv_cache import KVCache
from megatron.model.transformer import TransformerLayer


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The transformer blocks of `stage`: contiguous, as even as the division allows."""
    return range(stage * num_layers // stages, (stage + 1) * num_layers // stages)


class PipelinedGPT(nn.Module):
    """This process's stage of GPTModel (pipe rank and size from mpu), forward-only."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        group = mpu.get_pipe_parallel_group()
        self.ranks = dist.get_process_group_ranks(group)  # global ranks, stage order
        self.group = group
        self.stage, stages = mpu.get_pipe_parallel_rank(), mpu.get_pipe_parallel_world_size()
        self.first, self.last = self.stage == 0, self.stage == stages - 1
        tied = not config.no_weight_tying
        self.hidden_size, self.vocab_size = config.hidden_size, config.padded_vocab_size
        self.embedding = EmbeddingLayer(config) if self.first or (self.last and tied) else None
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerLayer(config, i)
                for i in stage_layers(config.num_layers, stages, self.stage)
            }
        )
        self.final_norm = FinalNorm(config) if self.last else None
        self.lm_head = (
            LMHead(config, tied_embedding=self.embedding if tied else None) if self.last else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """GPTModel.forward's arguments and result (full-vocabulary logits), on every stage."""
        if self.training:
            raise RuntimeError("PipelinedGPT runs forward-only: call .eval() first")
        if kv_cache is not None and position_ids is None:
            position_ids = kv_cache.positions(input_ids.size(1), input_ids.device)
        dtype = next(self.parameters()).dtype
        batch, length = input_ids.shape
        if self.first:
            h = self.embedding(input_ids, position_ids)
        else:
            h = input_ids.new_empty((batch, length, self.hidden_size), dtype=dtype)
            dist.recv(h, src=self.ranks[self.stage - 1])
        with shared_attention_masks():
            for layer in self.layers.values():
                h = layer(h, position_ids, attention_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(length)
        kept = logits_to_keep if 0 < logits_to_keep < length else length
        if self.last:
            h = self.final_norm(h)[:, length - kept :]
            logits = self.lm_head(h).contiguous()
        else:
            dist.send(h.contiguous(), dst=self.ranks[self.stage + 1])
            logits = input_ids.new_empty((batch, kept, self.vocab_size), dtype=dtype)
        dist.broadcast(logits, src=self.ranks[-1], group=self.group)
        return logits
