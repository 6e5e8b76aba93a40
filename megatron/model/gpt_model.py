"""The GPT model: embedding -> transformer layers -> final norm -> LM head."""

from __future__ import annotations

import torch
from torch import nn

from megatron.model.activation_checkpointing import checkpointed
from megatron.model.attention_backends import shared_attention_masks
from megatron.model.config import ModelConfig
from megatron.model.embedding import EmbeddingLayer
from megatron.model.init_methods import build_init_method
from megatron.model.kv_cache import KVCache
from megatron.model.mup import mark_width_independent, width_multiplier
from megatron.model.norms import build_norm
from megatron.model.transformer import TransformerLayer
from megatron.mpu.layers import parallel_lm_logits, partitioned_parameter
from megatron.mpu.random import init_rng


class FinalNorm(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = build_norm(config)

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
        config: ModelConfig,
        tied_embedding: EmbeddingLayer | None = None,
        parallel_output: bool = False,
    ) -> None:
        super().__init__()
        self.parallel_output = parallel_output
        self.output_mult = (
            config.mup_output_temp / width_multiplier(config) if config.use_mup else 1.0
        )
        # Bypass Module.__setattr__: the embedding must not become a second parent of its weight.
        object.__setattr__(self, "tied_embedding", tied_embedding)
        if tied_embedding is None:
            with init_rng(config.seed, config.num_layers + 1):
                self.weight = mark_width_independent(
                    partitioned_parameter(
                        (config.padded_vocab_size, config.hidden_size),
                        0,
                        build_init_method(config, "init_method", role="output"),
                        config.params_dtype,
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
        return parallel_lm_logits(hidden, self.output_weight(), self.parallel_output)


class GPTModel(nn.Module):
    """Every layer, unpipelined (pipeline stages reuse the same layer classes). Its
    tensor-parallel layers shard it; the rest of a layout (sequence parallelism, gradient
    reductions) is applied to it by megatron.engine.parallelize.

    ``parallel_output=True`` returns each tensor-parallel rank's vocabulary shard of the logits;
    the default gathers the full padded vocabulary (the two agree at TP=1).
    """

    def __init__(self, config: ModelConfig, parallel_output: bool = False) -> None:
        super().__init__()
        self.embedding = EmbeddingLayer(config)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        # Blocks per recomputed chunk in training (0: keep every activation).
        self.checkpoint_num_layers = config.checkpoint_num_layers
        self.final_norm = FinalNorm(config)
        self.lm_head = LMHead(
            config,
            tied_embedding=None if config.no_weight_tying else self.embedding,
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
        if self.checkpoint_num_layers and self.training and torch.is_grad_enabled():
            h = self._checkpointed_layers(h, position_ids, attention_mask)
        else:
            with shared_attention_masks():  # every layer gets the same mask: combine it once
                for layer in self.layers:
                    h = layer(h, position_ids, attention_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.size(1))
        h = self.final_norm(h)
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def _checkpointed_layers(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The blocks in chunks of checkpoint_num_layers, each recomputed in the backward."""
        size = self.checkpoint_num_layers
        for start in range(0, len(self.layers), size):
            chunk = self.layers[start : start + size]

            def run(x: torch.Tensor, *inputs: torch.Tensor | None, chunk=chunk) -> torch.Tensor:
                for layer in chunk:
                    x = layer(x, *inputs)
                return x

            h = checkpointed(run, h, position_ids, attention_mask)
        return h


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements held by this process (shared weights count once)."""
    return sum(p.numel() for p in model.parameters())
