"""The transformer language model, built from layers shared with the pipeline specs."""

from megatron.model.activations import ACTIVATIONS, register_activation
from megatron.model.config import ModelConfig
from megatron.model.embedding import EmbeddingLayer
from megatron.model.gpt_model import FinalNorm, GPTModel, LMHead, count_parameters
from megatron.model.init_methods import INIT_METHODS, build_init_method, register_init_method
from megatron.model.norms import NORMS, build_norm, register_norm
from megatron.model.transformer import TransformerLayer

__all__ = [
    "ACTIVATIONS",
    "INIT_METHODS",
    "NORMS",
    "EmbeddingLayer",
    "FinalNorm",
    "GPTModel",
    "LMHead",
    "ModelConfig",
    "TransformerLayer",
    "build_init_method",
    "build_norm",
    "count_parameters",
    "register_activation",
    "register_init_method",
    "register_norm",
]
