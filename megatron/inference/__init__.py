"""The model and tokenizer of a checkpoint, ready for forward passes (generate.py, eval.py).

pipeline.py   a pipeline stage run forward-only (pipe_parallel_size >= 2)
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.checkpoint.load import load_checkpoint
from megatron.initialize import device, initialize_megatron
from megatron.model import GPTModel, ModelConfig
from megatron.neox_arguments import ConfigError
from megatron.tokenizer import build_tokenizer


def load_model(args: Any) -> tuple[torch.nn.Module, Any, dict]:
    """(model in eval mode, tokenizer, checkpoint metadata) of `args.load` at `args.iteration`,
    this process's shard of the layout the config gives: at pipe_parallel_size >= 2 its
    pipeline stage, which every rank calls like the whole model."""
    if args.model_type != "gpt":  # sampling and scoring use the transformer's KV cache
        raise ConfigError(f"model_type {args.model_type!r}: only transformers (gpt) load here")
    initialize_megatron(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    config = ModelConfig.from_neox(args)
    if args.pipe_parallel_size >= 2:
        from megatron.inference.pipeline import PipelinedGPT

        model = PipelinedGPT.build(config)
    else:
        model = GPTModel(config)
    model = model.to(device()).eval()
    metadata = load_checkpoint(args, model, None, None, load_rng=False)
    return model, tokenizer, metadata
