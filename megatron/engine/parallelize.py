"""The tensor- and sequence-parallel plan, applied to a built model (torchtitan's parallelize).

The model's layers compute with mpu's tensor-parallel layers and read no parallel state; what
else a layout needs is attached here, to the sequential model and to pipeline stages alike:

- every tensor-parallel layout: replicated weights that see only this rank's heads (the QK
  norms) sum their gradients over the tensor-parallel group;
- sequence parallelism: the embedding's output is cut to this rank's positions [b, s / tp, h]
  and the final norm's output gathered again for the head; the blocks' tensor-parallel linears
  gather and reduce-scatter the sequence; replicated weights that see only this rank's positions
  (the norms, the row-parallel biases) sum their gradients; a KV-cache call is refused.

A new layer class with such weights must be added here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from megatron.model.attention import SelfAttention
from megatron.model.embedding import EmbeddingLayer
from megatron.model.gpt_model import FinalNorm, GPTModel
from megatron.model.transformer import TransformerLayer
from megatron.mpu.initialize import get_tensor_model_parallel_world_size
from megatron.mpu.layers import ColumnParallelLinear, RowParallelLinear
from megatron.mpu.mappings import (
    gather_from_sequence_parallel_region,
    reduce_gradients_across_tensor_parallel,
    scatter_to_sequence_parallel_region,
)


def parallelize(model: nn.Module, sequence_parallel: bool = False) -> nn.Module:
    """Apply the plan for this process's tensor-parallel group to ``model`` (a GPTModel or a
    pipeline stage) in place; ``sequence_parallel`` takes effect with more than one rank."""
    if get_tensor_model_parallel_world_size() == 1:
        return model
    for module in model.modules():
        if isinstance(module, SelfAttention) and module.q_norm is not None:
            reduce_gradients_across_tensor_parallel(
                [*module.q_norm.parameters(), *module.k_norm.parameters()]
            )
    if sequence_parallel:
        shard_sequence(model)
    return model


def shard_sequence(model: nn.Module) -> None:
    """Split the activations between tensor-parallel regions along the sequence."""
    for module in model.modules():
        if isinstance(module, EmbeddingLayer):
            module.register_forward_hook(_scatter_output)
        elif isinstance(module, TransformerLayer):
            norms = (module.input_layernorm, module.post_attention_layernorm)
            reduce_gradients_across_tensor_parallel(
                [p for norm in norms if norm is not None for p in norm.parameters()]
            )
            for linear in module.modules():
                if isinstance(linear, (ColumnParallelLinear, RowParallelLinear)):
                    linear.use_sequence_parallel()
        elif isinstance(module, FinalNorm):
            reduce_gradients_across_tensor_parallel(module.parameters())
            module.register_forward_hook(_gather_output)
        elif isinstance(module, GPTModel):
            module.register_forward_pre_hook(_refuse_kv_cache, with_kwargs=True)


def _scatter_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return scatter_to_sequence_parallel_region(output)


def _gather_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    # The head's input copy already sums the gradient over the ranks.
    return gather_from_sequence_parallel_region(output, grad_is_partial=False)


def _refuse_kv_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = inspect.signature(module.forward).bind(*args, **kwargs)
    if call.arguments.get("kv_cache") is not None:
        raise ValueError(
            "sequence_parallel is a training layout: generate with sequence_parallel false"
        )
