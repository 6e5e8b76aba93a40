"""NeoX's model argument group: architecture, positions, norms, initialisation."""

from dataclasses import dataclass
from typing import Annotated, Literal

from megatron.neox_arguments.fields import Support, arg
from megatron.neox_arguments.typecheck import Registered

DEFAULT_ONLY, HINT = Support.DEFAULT_ONLY, Support.HINT

# Names the model's registries accept (see megatron/registry.py).
NormName = Annotated[str, Registered("norm")]
PosEmbName = Annotated[str, Registered("pos_emb", refused=("rpe",))]
AttentionBackendName = Annotated[str, Registered("attention_backend")]
ActivationName = Annotated[str, Registered("activation")]
InitMethodName = Annotated[str, Registered("init_method")]


@dataclass
class NeoXArgsModel:
    """Model arguments."""

    precision: Literal["fp16", "fp32", "bf16", "bfloat16"] | None = arg(
        None, "Numeric precision; derived from the fp16/bf16 dicts when unset (else fp32)."
    )
    model_type: Literal["gpt", "lstm"] = arg(
        "gpt",
        "Strata: the architecture: gpt (the transformer) or lstm (a baseline sized by hidden_size "
        "and num_layers, data parallel only; it ignores attention and positional keys).",
    )
    num_layers: int | None = arg(None, "Number of transformer layers.")
    hidden_size: int | None = arg(None, "Transformer hidden size.")
    intermediate_size: int | None = arg(
        None,
        "MLP intermediate size; 4 * hidden_size when unset. Gated activations use 2/3 of it, "
        "in two halves (Llama-2 7B: 32768 -> 11008).",
    )
    mlp_multiple_of: int = arg(1, "Round the MLP activation width up to a multiple of this.")
    expansion_factor: float | None = arg(
        None,
        "MLP intermediate size as a multiple of hidden_size (alternative to intermediate_size).",
    )
    num_attention_heads: int | None = arg(None, "Number of attention (query) heads.")
    num_kv_heads: int | None = arg(
        None,
        "Number of key/value heads (grouped-query attention); equals num_attention_heads when unset.",
    )
    seq_length: int | None = arg(None, "Training sequence length in tokens.")
    sliding_window_width: int | None = arg(
        None, "Sliding-window attention: each query sees at most this many keys, itself included."
    )
    max_position_embeddings: int | None = arg(
        None, "Largest position the model supports (size of learned position tables)."
    )
    norm: NormName = arg(
        "layernorm", "Normalisation layer (te_*: Transformer Engine's, when installed)."
    )
    layernorm_fusion: bool = arg(False, "Use a fused LayerNorm kernel.", HINT)
    rmsnorm_fusion: bool = arg(False, "Use a fused RMSNorm kernel.", HINT)
    use_qk_layernorm: bool = arg(
        False, "Normalise each query and key head (the `norm` type) before rotary embeddings."
    )
    layernorm_epsilon: float = arg(1.0e-5, "LayerNorm epsilon.")
    rms_norm_epsilon: float = arg(1.0e-8, "RMSNorm epsilon.")
    scalenorm_epsilon: float = arg(1.0e-8, "ScaleNorm epsilon.")
    pos_emb: PosEmbName = arg("learned", "Positional embedding type.")
    rpe_num_buckets: int = arg(
        32, "T5 relative position buckets (pos_emb rpe).", gate="pos_emb: rpe"
    )
    rpe_max_distance: int = arg(
        128, "T5 relative position maximum distance (pos_emb rpe).", gate="pos_emb: rpe"
    )
    opt_pos_emb_offset: int = arg(0, "Learned position offset (OPT uses 2).", DEFAULT_ONLY)
    no_weight_tying: bool = arg(False, "Untie the input embedding and the output layer.")
    attention_config: list | None = arg(
        None, "Attention type per layer as [[types, repeat], ...]; all global when unset."
    )
    sparsity_config: dict | None = arg(None, "DeepSpeed sparse-attention settings.")
    attention_backend: AttentionBackendName = arg(
        "sdpa",
        "Strata: implementation of global attention layers: sdpa (PyTorch), flash (flash-attn 2) "
        "or te (Transformer Engine).",
    )
    te_mha: bool = arg(False, "Use Transformer Engine attention (same as attention_backend: te).")
    num_unique_layers: int | None = arg(None, "Share parameters across layers.", DEFAULT_ONLY)
    param_sharing_style: str = arg(
        "grouped", "Order of shared layers (with num_unique_layers).", gate="num_unique_layers"
    )
    make_vocab_size_divisible_by: int = arg(128, "Pad the vocabulary to a multiple of this.")
    activation: ActivationName = arg(
        "gelu", "MLP activation function (geglu, swiglu, reglu, glu, bilinear: gated)."
    )
    use_flashattn_swiglu: bool = arg(False, "Use flash-attn's fused SwiGLU kernel.", HINT)
    scaled_upper_triang_masked_softmax_fusion: bool = arg(
        False, "Fused causal-mask softmax kernel.", HINT
    )
    scaled_masked_softmax_fusion: bool = arg(False, "Fused general-mask softmax kernel.", HINT)
    bias_gelu_fusion: bool = arg(False, "Fused bias + GeLU kernel.", HINT)
    bias_dropout_fusion: bool = arg(False, "Fused bias + dropout kernel.", HINT)
    rope_fusion: bool = arg(False, "Fused rotary-embedding kernel.", HINT)
    fp16_lm_cross_entropy: bool = arg(False, "Compute the LM cross entropy in fp16.", DEFAULT_ONLY)
    init_method_std: float = arg(0.02, "Standard deviation of the normal weight initialisation.")
    apply_query_key_layer_scaling: bool = arg(False, "Scale Q*K^T by 1/layer_number.", DEFAULT_ONLY)
    use_cpu_initialization: bool = arg(False, "Initialise parameters on the CPU.", HINT)
    attention_softmax_in_fp32: bool = arg(False, "Compute the attention softmax in fp32.", HINT)
    rotary_pct: float = arg(
        1.0, "Fraction of each head's dimensions that rotary embeddings rotate."
    )
    rotary_emb_base: int = arg(10000, "Rotary embedding base (theta).")
    rope_scaling: dict | None = arg(
        None,
        "Strata: rotary frequency scaling as in Hugging Face, e.g. {rope_type: llama3, factor: 8, "
        "low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192} or "
        "{rope_type: linear, factor: 2}.",
    )
    rotary_save_freqs_buffer: bool = arg(
        False, "Store the rotary inverse-frequency buffer in checkpoints.", HINT
    )
    init_method: InitMethodName = arg(
        "normal", "Initialisation of all weights but residual outputs."
    )
    output_layer_init_method: InitMethodName = arg(
        "scaled_normal", "Initialisation of residual output projections."
    )
    gmlp_attn_dim: int = arg(
        64,
        "Attention width inside gMLP blocks (attention type gmlp).",
        gate="attention_config: gmlp",
    )
    gpt_j_residual: bool = arg(False, "Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)).")
    gpt_j_tied: bool = arg(False, "With gpt_j_residual, share one norm for attention and MLP.")
    use_bias_in_norms: bool = arg(True, "Norm layers have a bias.")
    use_bias_in_attn_linear: bool = arg(True, "Attention projections have biases.")
    use_bias_in_mlp: bool = arg(True, "MLP projections have biases.")
    soft_prompt_tuning: dict | None = arg(None, "Soft prompt tuning settings.", DEFAULT_ONLY)
    mamba_selective_scan_fusion: bool = arg(False, "Fused Mamba selective scan.", HINT)
    mamba_causal_conv_fusion: bool = arg(False, "Fused Mamba causal conv1d.", HINT)
    mamba_inner_func_fusion: bool = arg(False, "Fused Mamba inner function.", HINT)
    mamba_selective_fp32_params: bool = arg(
        True, "Keep Mamba A and D in fp32 (Mamba layers).", gate="attention_config: mamba"
    )
    mamba_use_bias_in_conv: bool = arg(
        True, "Mamba conv1d bias (Mamba layers).", gate="attention_config: mamba"
    )
    mamba_use_bias_in_linears: bool = arg(
        False, "Mamba projection biases (Mamba layers).", gate="attention_config: mamba"
    )
    output_layer_parallelism: Literal["row", "column"] = arg(
        "column",
        "Split the output layer over hidden (row) or vocab (column) under TP.",
        DEFAULT_ONLY,
    )
    dim_att: int | None = arg(
        None, "RWKV attention width (RWKV layers).", gate="attention_config: rwkv"
    )
    head_size: int | None = arg(
        None, "RWKV head size (RWKV layers).", gate="attention_config: rwkv"
    )
    ffn_dim: int | None = arg(
        None, "RWKV feed-forward width (RWKV layers).", gate="attention_config: rwkv"
    )
