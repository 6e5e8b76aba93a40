"""ModelConfig: exactly what the model reads, and nothing about how it is trained or laid out.

Field names are GPT-NeoX's config keys, so ``ModelConfig.from_neox(args)`` copies them; the two
that combine several keys (each layer's attention backend, the recomputation chunk) are resolved
there once. ``ModelConfig.from_neox_keys(values, padded_vocab_size)`` builds one from a model's
NeoX keys alone (conversion: no training config), and tests can build one directly from the sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    max_position_embeddings: int
    # Key/value heads (grouped-query attention); None: one per query head.
    num_kv_heads: int | None = None
    # The MLP's activation width (a gated MLP's first projection is twice as wide); None: NeoX's
    # rule (4 x hidden_size).
    ffn_hidden_size: int | None = None
    norm: str = "layernorm"
    layernorm_epsilon: float = 1e-5
    rms_norm_epsilon: float = 1e-8
    scalenorm_epsilon: float = 1e-8
    use_bias_in_norms: bool = True
    activation: str = "gelu"
    use_bias_in_mlp: bool = True
    use_bias_in_attn_linear: bool = True
    use_qk_layernorm: bool = False
    pos_emb: str = "learned"
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rope_scaling: dict | None = None
    sliding_window_width: int | None = None
    # Each layer's attention backend; empty: "sdpa" everywhere.
    attention_backends: tuple[str, ...] = ()
    gpt_j_residual: bool = False
    gpt_j_tied: bool = False
    no_weight_tying: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    seed: int = 1234
    use_mup: bool = False
    mup_base_width: int | None = None
    mup_init_scale: float = 1.0
    mup_embedding_mult: float = 1.0
    mup_output_temp: float = 1.0
    mup_attn_temp: float = 1.0
    params_dtype: torch.dtype = torch.float32
    # Blocks per recomputed chunk in training; 0 keeps every activation.
    checkpoint_num_layers: int = 0
    # "gpt" (GPTModel) or "lstm" (megatron/model/lstm.py); build_model picks the class.
    model_type: str = "gpt"

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if not self.attention_backends:
            object.__setattr__(self, "attention_backends", ("sdpa",) * self.num_layers)
        if len(self.attention_backends) != self.num_layers:
            raise ValueError(
                f"attention_backends names {len(self.attention_backends)} layers, "
                f"expected num_layers ({self.num_layers})"
            )

    @classmethod
    def from_neox(cls, args: Any) -> ModelConfig:
        """The model part of a validated NeoX config (NeoXArgs)."""
        from megatron.model.attention_backends import layer_backend_name

        derived = {
            "attention_backends": tuple(
                layer_backend_name(args, i) for i in range(args.num_layers)
            ),
            "checkpoint_num_layers": (
                args.checkpoint_num_layers if args.checkpoint_activations else 0
            ),
        }
        copied = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in derived
        }
        return cls(**copied, **derived)

    @classmethod
    def from_neox_keys(
        cls, values: Mapping[str, Any], padded_vocab_size: int, source: str = "the model config"
    ) -> ModelConfig:
        """The model NeoX config keys describe, from those keys alone: no batch, data, optimizer
        or parallel settings are needed (conversion reads a model config file or a Hugging Face
        config). Keys are checked as a config's are (ConfigError naming the key and `source`);
        keys left out take NeoX's defaults. In fp32: the checkpoint's tensors keep their dtype."""
        from megatron.neox_arguments.model_keys import model_keys

        keys = model_keys(values, source)
        model = {
            **vars(keys),
            "padded_vocab_size": padded_vocab_size,
            "params_dtype": torch.float32,
        }
        return cls.from_neox(SimpleNamespace(**model))
