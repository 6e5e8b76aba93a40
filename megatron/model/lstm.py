"""The LSTM language model (`model_type: lstm`): embedding -> num_layers torch LSTM layers of
hidden_size -> output head, tied to the embedding unless no_weight_tying.

A baseline for scaling studies, trained by the same loop, data, checkpoints and metrics as the
transformer. It reads only the sizes, dropout, tying, initialisation and dtype from the model
config; the attention, positional, norm and MLP keys are ignored, and it runs over packed
samples as they come (a document boundary does not reset the state). Data parallel only: a
config with tensor or pipeline parallelism is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.config import ModelConfig
from megatron.mpu.random import init_rng
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.rules import register_rule


class LSTMModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        vocab, hidden, dtype = config.padded_vocab_size, config.hidden_size, config.params_dtype
        # Seeded streams, as the transformer's layers: every data-parallel rank starts alike.
        with init_rng(config.seed, 0):
            words = nn.Embedding(vocab, hidden, dtype=dtype)
            nn.init.normal_(words.weight, std=config.init_method_std)
        # The transformer's names (embedding.word_embeddings, lm_head): checkpoints read the
        # padded vocabulary from them.
        self.embedding = nn.ModuleDict({"word_embeddings": words})
        with init_rng(config.seed, 1):
            self.lstm = nn.LSTM(
                hidden,
                hidden,
                config.num_layers,
                batch_first=True,
                dropout=config.hidden_dropout if config.num_layers > 1 else 0.0,
                dtype=dtype,
            )
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.lm_head = None
        if config.no_weight_tying:
            with init_rng(config.seed, 2):
                self.lm_head = nn.Linear(hidden, vocab, bias=False, dtype=dtype)
                nn.init.normal_(self.lm_head.weight, std=config.init_method_std)

    def forward(self, input_ids: torch.Tensor, *unused: Any) -> torch.Tensor:
        """[b, s] token ids -> [b, s, padded_vocab] logits. Position ids and attention masks
        (the transformer's other inputs) mean nothing to a recurrent model."""
        words = self.embedding["word_embeddings"]
        hidden, _ = self.lstm(self.dropout(words(input_ids)))
        head = words if self.lm_head is None else self.lm_head
        return F.linear(self.dropout(hidden), head.weight)


@register_rule("model_type")
def _check_lstm_layout(args: Any, problems: Problems) -> None:
    """The LSTM has no tensor-parallel layers or pipeline stages."""
    if args.model_type != "lstm":
        return
    for key in ("model_parallel_size", "pipe_parallel_size"):
        value = getattr(args, key)
        if value > 1:
            problems.add(
                f"{key}={value}{args.where(key)}: model_type lstm{args.where('model_type')} is "
                f"data parallel only; set {key} to 1"
            )
