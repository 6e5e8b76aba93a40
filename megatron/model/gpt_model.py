"""The GPT model: embedding -> transformer layers -> final norm -> LM head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.embedding import EmbeddingLayer
from megatron.model.init_methods import build_init_method
from megatron.model.kv_cache import KVCache
from megatron.model.mup import mark_width_independent, width_multiplier
from megatron.model.norms import build_norm
from megatron.model.transformer import TransformerLayer
from megatron.mpu.layers import partitioned_parameter
from megatron.mpu.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.mpu.random import init_rng


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, parallel_output: bool) -> torch.Tensor:
    """Logits from [b, s, h] and a vocabulary-parallel [vocab / tp, h] weight; with
    ``parallel_output`` each rank keeps its vocabulary shard (for vocab_parallel_cross_entropy)."""
    logits = F.linear(copy_to_tensor_model_parallel_region(hidden), weight)
    return logits if parallel_output else gather_from_tensor_model_parallel_region(logits)


class FinalNorm(nn.Module):
    def __init__(self, args: Any) -> None:
        super().__init__()
        self.norm = build_norm(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class LMHead(nn.Module):
    """Projection to the padded vocabulary; tied to ``tied_embedding``'s word embeddings if given.

    A tied head registers no parameter of its own, so the state dict holds the shared weight
    once, under the embedding's name. Under muP the logits are multiplied by
    ``mup_output_temp / m`` (m = hidden_size / mup_base_width).
    """

    def __init__(
        self,
        args: Any,
        tied_embedding: EmbeddingLayer | None = None,
        parallel_output: bool = False,
    ) -> None:
        super().__init__()
        self.parallel_output = parallel_output
        self.output_mult = args.mup_output_temp / width_multiplier(args) if args.use_mup else 1.0
        # Bypass Module.__setattr__: the embedding must not become a second parent of its weight.
        object.__setattr__(self, "tied_embedding", tied_embedding)
        if tied_embedding is None:
            with init_rng(args.seed, args.num_layers + 1):
                self.weight = mark_width_independent(
                    partitioned_parameter(
                        (args.padded_vocab_size, args.hidden_size),
                        0,
                        build_init_method(args, "init_method", role="output"),
                        args.params_dtype,
                    )
                )

    def output_weight(self) -> torch.Tensor:
        return (
            self.weight
            if self.tied_embedding is None
            else self.tied_embedding.word_embeddings.weight
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_mult != 1.0:
            hidden = hidden * self.output_mult
        return lm_logits(hidden, self.output_weight(), self.parallel_output)


class GPTModel(nn.Module):
    """The whole model in one process (pipeline stages reuse the same layer classes).

    ``parallel_output=True`` returns each tensor-parallel rank's vocabulary shard of the logits;
    the default gathers the full padded vocabulary (the two agree at TP=1).
    """

    def __init__(self, args: Any, parallel_output: bool = False) -> None:
        super().__init__()
        self.embedding = EmbeddingLayer(args)
        self.layers = nn.ModuleList(TransformerLayer(args, i) for i in range(args.num_layers))
        self.final_norm = FinalNorm(args)
        self.lm_head = LMHead(
            args,
            tied_embedding=None if args.no_weight_tying else self.embedding,
            parallel_output=parallel_output,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """[b, s] token ids -> [b, s, padded_vocab] logits in the parameters' dtype (only the
        last ``logits_to_keep`` positions' when > 0: sampling skips the LM head elsewhere).

        ``attention_mask``: boolean, True where a query may attend to a key, broadcastable to
        [b, 1, s, s]; attention is causal and the mask restricts it further. With ``kv_cache``
        (docs/interfaces.md) the tokens follow the cached ones: the mask is [b, 1, s,
        cache.length + s] and positions default to cache.length + 0..s-1.
        """
        if kv_cache is not None and position_ids is None:
            position_ids = kv_cache.positions(input_ids.size(1), input_ids.device)
        h = self.embedding(input_ids, position_ids)
        for layer in self.layers:
            h = layer(h, position_ids, attention_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.size(1))
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.final_norm(h))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements held by this process (shared weights count once)."""
    return sum(p.numel() for p in model.parameters())
