"""A pipeline stage run forward-only, for scoring and sampling at pipe_parallel_size >= 2.

Every rank of a pipeline calls ``forward`` with the same arguments, as it would call
``GPTModel``: the first stage embeds the tokens and sends the hidden state on, each stage runs
its blocks (filling its layers' slots of the KV cache), and the last stage's logits are
broadcast back to every stage, so the caller's code (the harness adapter, sampling) runs
unchanged on every rank. Stages run one after another (no micro-batch overlap): a pipeline here
holds a model too large for one device's memory; it does not make evaluation faster.

``PipelinedGPT.build`` makes a fresh stage for eval.py and generate.py, whose parameter names
are GPTModel's (``embedding.*``, ``layers.{i}.*``, ``final_norm.*``, ``lm_head.*``), so a
layout-free checkpoint loads into it as into the whole model (with tied embeddings the last
stage holds its own copy of the word embeddings). ``PipelinedGPT.of_stage`` runs the layers of
a training pipeline's stage in place, for the harness during training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
from megatron.mpu.mappings import gather_from_tensor_model_parallel_region


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The transformer blocks of `stage`: contiguous, as even as the division allows."""
    return range(stage * num_layers // stages, (stage + 1) * num_layers // stages)


class PipelinedGPT(nn.Module):
    """This process's stage of a GPT model (pipe rank and size from mpu), forward-only.

    `embedding` runs on the first stage; `head` (hidden -> logits, vocabulary-parallel if
    `head_is_vocab_parallel`) on the last, after `final_norm`."""

    def __init__(
        self,
        embedding: EmbeddingLayer | None,
        layers: dict[str, TransformerLayer],
        final_norm: FinalNorm | None,
        head: Callable[[torch.Tensor], torch.Tensor] | None,
        head_is_vocab_parallel: bool,
        hidden_size: int,
        vocab_size: int,
    ) -> None:
        super().__init__()
        self.group = mpu.get_pipe_parallel_group()
        self.ranks = dist.get_process_group_ranks(self.group)  # global ranks, stage order
        self.stage = mpu.get_pipe_parallel_rank()
        self.first, self.last = self.stage == 0, self.stage == len(self.ranks) - 1
        self.embedding = embedding
        self.layers = nn.ModuleDict(layers)
        self.final_norm = final_norm
        if isinstance(head, nn.Module):
            self.lm_head = head  # registered: an untied head's weight loads as lm_head.weight
        # Also as a plain attribute: a tied training head is a function over the embedding.
        object.__setattr__(self, "head", head)
        self.head_is_vocab_parallel = head_is_vocab_parallel
        self.hidden_size, self.vocab_size = hidden_size, vocab_size

    @classmethod
    def build(cls, config: ModelConfig) -> PipelinedGPT:
        """A fresh stage: contiguous blocks, the embedding first, the norm and head last."""
        stage, stages = mpu.get_pipe_parallel_rank(), mpu.get_pipe_parallel_world_size()
        first, last = stage == 0, stage == stages - 1
        tied = not config.no_weight_tying
        embedding = EmbeddingLayer(config) if first or (last and tied) else None
        blocks = stage_layers(config.num_layers, stages, stage)
        return cls(
            embedding,
            {str(i): TransformerLayer(config, i) for i in blocks},
            FinalNorm(config) if last else None,
            LMHead(config, tied_embedding=embedding if tied else None) if last else None,
            False,
            config.hidden_size,
            config.padded_vocab_size,
        )

    @classmethod
    def of_stage(cls, stage: nn.Module, config: ModelConfig) -> PipelinedGPT:
        """The layers of a training pipeline stage (DeepSpeed's PipelineModule of
        megatron.engine.pipeline), shared, not copied; its head keeps vocabulary-parallel
        logits, gathered here."""
        embedding = final_norm = head = None
        layers: dict[str, TransformerLayer] = {}
        for function in stage.forward_funcs:
            if isinstance(function, EmbeddingLayer):
                embedding = function
            elif isinstance(function, TransformerLayer):
                layers[str(function.layer_number)] = function
            elif isinstance(function, FinalNorm):
                final_norm = function
            elif isinstance(function, LMHead):
                head = function
            elif isinstance(function, functools.partial):  # the tied head over the embedding
                head = function
            else:
                raise TypeError(f"unexpected pipeline layer {function!r}")
        return cls(
            embedding, layers, final_norm, head, True, config.hidden_size, config.padded_vocab_size
        )

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.final_norm(hidden))
        if self.head_is_vocab_parallel:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits.contiguous()

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
            logits = self._logits(h[:, length - kept :])
        else:
            dist.send(h.contiguous(), dst=self.ranks[self.stage + 1])
            logits = input_ids.new_empty((batch, kept, self.vocab_size), dtype=dtype)
        dist.broadcast(logits, src=self.ranks[-1], group=self.group)
        return logits
