"""Model sizes derived from the config: MLP width and parameter count (NeoX architecture)."""

from __future__ import annotations

from typing import Any

# Activations whose MLP input projection has two halves [gate; up]. The model's activation
# registry (megatron/model/activations.py) adds the gated activations users register.
GATED_ACTIVATIONS: set[str] = {"geglu", "reglu", "swiglu", "bilinear", "glu"}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def ffn_sizes(args: Any) -> tuple[int, int]:
    """(first projection's output width, activation width) of the MLP, as NeoX computes them.

    Base width: intermediate_size, else int(expansion_factor x hidden), else 4 x hidden. A gated
    activation keeps the parameter count of the ungated MLP: its first projection is
    int(2/3 x base) wide, split in two halves [gate; up], so the activation width is
    int(2/3 x base) // 2 (Llama-2 7B: intermediate_size 32768 -> 11008 with mlp_multiple_of
    256). The activation width is rounded up to mlp_multiple_of.
    """
    if args.intermediate_size:
        base = args.intermediate_size
    elif args.expansion_factor:
        base = int(args.expansion_factor * args.hidden_size)
    else:
        base = 4 * args.hidden_size
    multiple = args.mlp_multiple_of
    if args.activation in GATED_ACTIVATIONS:
        hidden = _round_up(base * 2 // 3 // 2, multiple)
        return 2 * hidden, hidden
    hidden = _round_up(base, multiple)
    return hidden, hidden


def _norm_params(args: Any, width: int | None = None) -> int:
    """Parameters of one norm (over `width`, default hidden_size): weight (+ bias) for
    layernorm, weight for rmsnorm, one gain for scalenorm, none for non_parametric_layernorm."""
    h = width or args.hidden_size
    if args.norm in ("layernorm", "te_layernorm"):
        return 2 * h if args.use_bias_in_norms else h
    if args.norm == "scalenorm":
        return 1
    if args.norm == "non_parametric_layernorm":
        return 0
    return h


def lstm_layer_params(hidden: int) -> int:
    """One torch.nn.LSTM layer: four gates, each with input and hidden weights and two biases."""
    return 4 * (2 * hidden * hidden + 2 * hidden)


def parameter_counts(args: Any) -> dict[str, int]:
    """Parameters of the embedding, all layers, final norm and output layer, and the total."""
    h, heads = args.hidden_size, args.num_attention_heads
    vocab = args.padded_vocab_size
    if getattr(args, "model_type", "gpt") == "lstm":
        counts = {
            "embedding": vocab * h,
            "layers": lstm_layer_params(h) * args.num_layers,
            "final_norm": 0,
            "output": vocab * h if args.no_weight_tying else 0,
        }
        counts["total"] = sum(counts.values())
        return counts
    kv_width = (h // heads) * (args.num_kv_heads or heads)
    embedding = vocab * h
    if args.pos_emb == "learned":
        embedding += args.max_position_embeddings * h
    qkv_out = h + 2 * kv_width
    attention = h * qkv_out + h * h
    if args.use_bias_in_attn_linear:
        attention += qkv_out + h
    proj, width = ffn_sizes(args)
    mlp = h * proj + width * h
    if args.use_bias_in_mlp:
        mlp += proj + h
    # With tied GPT-J residual norms the second norm does not exist.
    norms = 1 if (args.gpt_j_residual and args.gpt_j_tied) else 2
    layer = attention + mlp + norms * _norm_params(args)
    if args.use_qk_layernorm:  # one norm over a head's channels for queries, one for keys
        layer += 2 * _norm_params(args, h // heads)
    if args.pos_emb == "rpe":
        # T5 relative position biases: one table per model, buckets x heads.
        embedding += args.rpe_num_buckets * heads
    counts = {
        "embedding": embedding,
        "layers": layer * args.num_layers,
        "final_norm": _norm_params(args),
        "output": vocab * h if args.no_weight_tying else 0,
    }
    counts["total"] = sum(counts.values())
    return counts
