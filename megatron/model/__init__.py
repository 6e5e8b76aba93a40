"""The language models (the transformer, built from layers shared with the pipeline specs, and
the LSTM baseline) and `build_model`, which picks one by `model_type`."""

from megatron.model.activations import ACTIVATIONS, register_activation
from megatron.model.config import ModelConfig
from megatron.model.embedding import EmbeddingLayer
from megatron.model.gpt_model import FinalNorm, GPTModel, LMHead, count_parameters
from megatron.model.init_methods import INIT_METHODS, build_init_method, register_init_method
from megatron.model.lstm import LSTMModel
from megatron.model.norms import NORMS, build_norm, register_norm
from megatron.model.transformer import TransformerLayer

__all__ = [
    "ACTIVATIONS",
    "INIT_METHODS",
    "NORMS",
    "EmbeddingLayer",
    "FinalNorm",
    "GPTModel",
    "LSTMModel",
    "LMHead",
    "ModelConfig",
    "TransformerLayer",
    "build_init_method",
    "build_model",
    "build_norm",
    "count_parameters",
    "register_activation",
    "register_init_method",
    "register_norm",
]


def build_model(config: ModelConfig, parallel_output: bool = False) -> GPTModel | LSTMModel:
    """The model ``config.model_type`` names (``parallel_output``: see GPTModel)."""
    if config.model_type == "lstm":
        return LSTMModel(config)
    return GPTModel(config, parallel_output=parallel_output)
