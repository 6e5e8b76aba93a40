"""Architecture settings between a Hugging Face config and NeoX keys, per architecture.

`*_to_neox(config)` turns a `transformers` config into the NeoX architecture keys; `neox_to_*`
turns a `ModelConfig` into the keyword arguments of the Hugging Face config class, refusing
settings the Hugging Face architecture cannot express (each error names the key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.model.config import ModelConfig


class ConversionError(ValueError):
    """An input that cannot be converted: the message names the file, tensor or key."""


# Hugging Face `hidden_act` <-> NeoX `activation` (elementwise ones Strata computes exactly).
HF_ACTIVATIONS = {name: name for name in ("gelu", "relu", "silu", "mish", "tanh", "sigmoid")}
NEOX_ACTIVATIONS = {**{v: k for k, v in HF_ACTIVATIONS.items()}, "swish": "silu"}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def _rope_scaling(rope: dict[str, Any], source: str) -> dict[str, Any] | None:
    """NeoX's `rope_scaling` from Hugging Face `rope_parameters` (None for plain RoPE)."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    from megatron.model.positional import ROPE_SCALINGS

    if kind not in ROPE_SCALINGS:
        raise ConversionError(
            f"{source}: rope_type {kind!r} has no Strata equivalent; "
            f"supported: default, {', '.join(sorted(ROPE_SCALINGS))}"
        )
    needed = ROPE_SCALINGS[kind][0]
    return {"rope_type": kind, **{key: rope[key] for key in needed}}


def _integral(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _common_to_neox(config: Any, source: str) -> dict[str, Any]:
    rope = dict(config.rope_parameters or {})
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    _require(not nested, f"{source}: per-layer-type rope_parameters {nested} are not supported")
    values = {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "seq_length": config.max_position_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "pos_emb": "rotary",
        "rotary_pct": float(rope.get("partial_rotary_factor", 1.0)),
        "rotary_emb_base": _integral(rope.get("rope_theta", 10000)),
        "no_weight_tying": not config.tie_word_embeddings,
        "gpt_j_tied": False,
    }
    scaling = _rope_scaling(rope, source)
    if scaling is not None:
        values["rope_scaling"] = scaling
    return values


def gpt_neox_to_neox(config: Any, source: str) -> dict[str, Any]:
    act = config.hidden_act
    _require(
        act in HF_ACTIVATIONS,
        f"{source}: hidden_act {act!r} has no exact Strata activation; "
        f"supported: {sorted(HF_ACTIVATIONS)}",
    )
    return {
        **_common_to_neox(config, source),
        "intermediate_size": config.intermediate_size,
        "norm": "layernorm",
        "layernorm_epsilon": config.layer_norm_eps,
        "activation": HF_ACTIVATIONS[act],
        "gpt_j_residual": bool(config.use_parallel_residual),
        "use_bias_in_norms": True,
        "use_bias_in_attn_linear": bool(config.attention_bias),
        "use_bias_in_mlp": True,
    }


def _gated_intermediate(hidden_width: int) -> int:
    # NeoX sizes a gated MLP from intermediate_size as int(2/3 x it) split in two halves, so
    # 3 x the Hugging Face width gives exactly that width (checked against ffn_sizes).
    return 3 * hidden_width


def llama_to_neox(config: Any, source: str) -> dict[str, Any]:
    _require(
        config.hidden_act == "silu",
        f"{source}: hidden_act {config.hidden_act!r}: only silu (SwiGLU) Llama MLPs convert",
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    _require(
        head_dim * config.num_attention_heads == config.hidden_size,
        f"{source}: head_dim {head_dim} x num_attention_heads {config.num_attention_heads} != "
        f"hidden_size {config.hidden_size}; Strata needs head_dim = hidden_size / heads",
    )
    return {
        **_common_to_neox(config, source),
        "num_kv_heads": config.num_key_value_heads or config.num_attention_heads,
        "intermediate_size": _gated_intermediate(config.intermediate_size),
        "norm": "rmsnorm",
        "rms_norm_epsilon": config.rms_norm_eps,
        "activation": "swiglu",
        "gpt_j_residual": False,
        "use_bias_in_norms": False,
        "use_bias_in_attn_linear": bool(getattr(config, "attention_bias", False)),
        "use_bias_in_mlp": bool(getattr(config, "mlp_bias", False)),
    }


def mistral_to_neox(config: Any, source: str) -> dict[str, Any]:
    values = llama_to_neox(config, source)
    if config.sliding_window is not None:
        values["sliding_window_width"] = config.sliding_window
    return values


# ------------------------------------------------------------------------ NeoX -> Hugging Face


def _common_to_hf(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    _require(model.pos_emb == "rotary", f"pos_emb {model.pos_emb!r}: only rotary models convert")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rotary_emb_base)}
    scaling = model.rope_scaling
    if scaling:
        rope.update({k: v for k, v in scaling.items() if k != "type"})
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return {
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": not model.no_weight_tying,
        "rope_parameters": rope,
    }


def _no_sliding_window(model: ModelConfig, arch: str) -> None:
    _require(
        model.sliding_window_width is None,
        f"sliding_window_width={model.sliding_window_width}: {arch} has no sliding window "
        "(use --architecture mistral)",
    )


def neox_to_gpt_neox(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    arch = "gpt_neox"
    _require(model.norm == "layernorm", f"norm {model.norm!r}: {arch} uses layernorm")
    _require(model.use_bias_in_norms, f"use_bias_in_norms=false: {arch} norms have biases")
    _require(model.use_bias_in_mlp, f"use_bias_in_mlp=false: {arch} MLPs have biases")
    _require(
        model.activation in NEOX_ACTIVATIONS,
        f"activation {model.activation!r}: {arch} supports {sorted(NEOX_ACTIVATIONS)}",
    )
    _require(
        model.num_kv_heads in (None, model.num_attention_heads),
        f"num_kv_heads={model.num_kv_heads}: {arch} has no grouped-query attention",
    )
    _require(
        not (model.gpt_j_residual and model.gpt_j_tied),
        f"gpt_j_tied=true: {arch} has two norms per layer",
    )
    _no_sliding_window(model, arch)
    values = _common_to_hf(model, vocab_size)
    values["rope_parameters"]["partial_rotary_factor"] = model.rotary_pct
    return {
        **values,
        "intermediate_size": model.ffn_hidden_size,
        "hidden_act": NEOX_ACTIVATIONS[model.activation],
        "layer_norm_eps": model.layernorm_epsilon,
        "use_parallel_residual": bool(model.gpt_j_residual),
        "attention_bias": bool(model.use_bias_in_attn_linear),
    }


def neox_to_llama(model: ModelConfig, vocab_size: int, arch: str = "llama") -> dict[str, Any]:
    _require(model.norm == "rmsnorm", f"norm {model.norm!r}: {arch} uses rmsnorm")
    _require(model.activation == "swiglu", f"activation {model.activation!r}: {arch} uses swiglu")
    _require(
        model.rotary_pct == 1.0, f"rotary_pct={model.rotary_pct}: {arch} rotates every channel"
    )
    _require(not model.gpt_j_residual, f"gpt_j_residual=true: {arch} has sequential residuals")
    values = {
        **_common_to_hf(model, vocab_size),
        "num_key_value_heads": model.num_kv_heads or model.num_attention_heads,
        "head_dim": model.hidden_size // model.num_attention_heads,
        "intermediate_size": model.ffn_hidden_size,
        "hidden_act": "silu",
        "rms_norm_eps": model.rms_norm_epsilon,
    }
    if arch == "llama":
        _no_sliding_window(model, arch)
        values["attention_bias"] = bool(model.use_bias_in_attn_linear)
        values["mlp_bias"] = bool(model.use_bias_in_mlp)
    return values


def neox_to_mistral(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    arch = "mistral"
    for key in ("use_bias_in_attn_linear", "use_bias_in_mlp"):
        _require(not getattr(model, key), f"{key}=true: {arch} projections have no biases")
    return {
        **neox_to_llama(model, vocab_size, arch),
        "sliding_window": model.sliding_window_width,
    }
