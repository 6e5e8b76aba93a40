"""Per-GPU memory of a training run, from the config alone: weights, gradients, optimizer state,
activations and logits for its TP x PP x DP x ZeRO layout, and a verdict against a device.

The weight, gradient and optimizer terms are exact for the tensors Strata allocates (checked
against real allocations in tests/test_memory_estimate.py). Activations count the tensors the
autograd graph saves for the backward in Strata's layers (PyTorch's SDPA kernels keep no
s x s score matrix; attention dropout does, on its math path); the CUDA context, allocator
fragmentation and DeepSpeed's communication buckets are not included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron.neox_arguments.errors import ConfigError
from megatron.neox_arguments.sizes import GATED_ACTIVATIONS, ffn_sizes, parameter_counts

# fp32 values an optimizer keeps per parameter, by optimizer.type (lower case), given
# optimizer.params. Optimizers register theirs next to their factory (megatron/optimizers.py);
# an unregistered type is assumed to keep Adam's two moments.
OptimizerStates = Callable[[dict], float]
OPTIMIZER_STATES: dict[str, OptimizerStates] = {}
DEFAULT_OPTIMIZER_STATES = 2.0


def register_optimizer_state(*names: str) -> Callable[[OptimizerStates], OptimizerStates]:
    """Decorator: ``states(params) -> fp32 values per parameter`` for the optimizer ``names``."""

    def add(states: OptimizerStates) -> OptimizerStates:
        for name in names:
            OPTIMIZER_STATES[name.lower()] = states
        return states

    return add


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str, key: str = "device_memory") -> int:
    """'80GB', '80GiB', '80G', '512MB' or a plain number of bytes. GB and GiB both mean 2^30:
    accelerators are sold in binary units (an "80GB" A100 has 80 GiB)."""
    match = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b)?\s*", str(text).lower()
    )
    if not match:
        raise ConfigError(f"{key}: expected a size such as 80GB, 512MiB or 1e9, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(count: float) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= scale:
            return f"{count / scale:.2f} {suffix}"
    return f"{int(count)} B"


def _dtype_bytes(args: Any) -> int:
    return 2 if args.precision in ("fp16", "bf16") else 4


def _stage_layers(args: Any) -> int:
    return math.ceil(args.num_layers / max(args.pipe_parallel_size, 1))


def parameters_per_gpu(args: Any) -> int:
    """Parameters held by the GPU with the most: the first or the last pipeline stage, each
    tensor-parallel matrix split over model_parallel_size (norms and row-parallel biases whole)."""
    counts = parameter_counts(args)
    if args.model_type == "lstm":  # data parallel only
        return counts["total"]
    tp = max(args.model_parallel_size, 1)
    h, vocab = args.hidden_size, args.padded_vocab_size
    # What tensor parallelism does not split: norms and the biases after row-parallel layers.
    replicated = counts["layers"] // args.num_layers - _split_layer_params(args)
    layer = _split_layer_params(args) // tp + replicated
    word = vocab * h // tp
    embedding = word + counts["embedding"] - vocab * h
    head = counts["final_norm"] + (vocab * h // tp if args.no_weight_tying else 0)
    layers = _stage_layers(args) * layer
    if max(args.pipe_parallel_size, 1) == 1:
        return embedding + layers + head
    # The last stage keeps its own copy of a tied embedding for the head.
    last = layers + head + (0 if args.no_weight_tying else word)
    return max(embedding + layers, last)


def _split_layer_params(args: Any) -> int:
    """A layer's parameters that tensor parallelism splits: its four matrices and the biases
    of the column-parallel ones."""
    h, heads = args.hidden_size, args.num_attention_heads
    qkv = h + 2 * (h // heads) * (args.num_kv_heads or heads)
    proj, width = ffn_sizes(args)
    split = h * qkv + h * h + h * proj + width * h
    if args.use_bias_in_attn_linear:
        split += qkv
    if args.use_bias_in_mlp:
        split += proj
    return split


def optimizer_state_values(args: Any) -> float:
    """fp32 values per parameter the optimizer keeps, plus the fp32 master copy that
    DeepSpeed's fp16/bf16 wrappers add."""
    spec = args.optimizer or {}
    states = OPTIMIZER_STATES.get(str(spec.get("type", "adam")).lower())
    values = DEFAULT_OPTIMIZER_STATES if states is None else states(spec.get("params") or {})
    return values + (1 if args.precision in ("fp16", "bf16") else 0)


def _norm_saved(args: Any) -> int:
    # Layer norm keeps its input and output; RMS-style norms an intermediate product too.
    return 2 if args.norm in ("layernorm", "te_layernorm", "non_parametric_layernorm") else 3


def layer_activation_bytes(args: Any, micro: int) -> float:
    """Bytes one transformer layer saves for the backward of one micro-batch on one GPU."""
    h, s, heads = args.hidden_size, args.seq_length, args.num_attention_heads
    tp = max(args.model_parallel_size, 1)
    size = _dtype_bytes(args)
    kv_width = (h // heads) * (args.num_kv_heads or heads)
    # Per token, in elements of the compute dtype. Shared by all tensor-parallel ranks (the
    # norms' inputs and outputs) unless sequence parallelism splits the sequence.
    replicated = 2 * _norm_saved(args) * h
    # Split over tensor-parallel ranks: q, k and v (grouped k/v are expanded to every query
    # head before attention), the attention output, rotary's rotated copies, the MLP.
    split = 4 * h
    if args.pos_emb == "rotary":
        split += 3 * kv_width
    _, width = ffn_sizes(args)
    split += 4 * width if args.activation in GATED_ACTIVATIONS else 2 * width
    tokens = micro * s
    dense = tokens * size * (split / tp + replicated / (tp if args.sequence_parallel else 1))
    # fp32 statistics: each norm's mean and reciprocal std, attention's log-sum-exp per head.
    stats = tokens * 4 * (4 + heads / tp)
    # Dropout keeps a one-byte mask per element: two per layer on the hidden states; attention
    # dropout moves SDPA to its math kernel, which keeps the s x s probabilities before and
    # after dropout.
    masks = 0.0
    if args.hidden_dropout > 0:
        masks += 2 * tokens * h
    if args.attention_dropout > 0:
        masks += micro * heads / tp * s * s * (2 * size + 1)
    return dense + stats + masks


def logits_bytes(args: Any, micro: int) -> float:
    """The logits (this rank's vocabulary shard) the cross entropy keeps, the final norm's
    input and output, and the embedding's saved token ids."""
    tp = max(args.model_parallel_size, 1)
    tokens = micro * args.seq_length
    vocab = args.padded_vocab_size // tp
    head = tokens * _dtype_bytes(args) * (vocab + _norm_saved(args) * args.hidden_size)
    return head + tokens * 8


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    # Activation checkpointing on: chunk inputs kept, one chunk recomputed at a time.
    checkpointed: bool

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def table(self) -> list[tuple[str, str]]:
        activations = "activations (checkpointed)" if self.checkpointed else "activations"
        return [
            ("weights", format_bytes(self.weights)),
            ("gradients", format_bytes(self.gradients)),
            ("optimizer state", format_bytes(self.optimizer)),
            (activations, format_bytes(self.activations)),
            ("logits", format_bytes(self.logits)),
            ("total per GPU", format_bytes(self.total)),
        ]


def activation_bytes(args: Any, micro: int, checkpointed: bool) -> float:
    """Saved tensors of the layers on the GPU with the most: with 1F1B pipelining the first
    stage holds min(pipe_parallel_size, accumulation steps) micro-batches in flight."""
    layers = _stage_layers(args)
    if args.model_type == "lstm":
        per_layer = lstm_layer_activation_bytes(args, micro)
    else:
        per_layer = layer_activation_bytes(args, micro)
    if checkpointed:
        chunk = max(args.checkpoint_num_layers, 1)
        inputs = micro * args.seq_length * args.hidden_size * _dtype_bytes(args)
        if args.partition_activations:  # each tensor-parallel rank keeps a slice of them
            inputs /= max(args.model_parallel_size, 1)
        # Chunk inputs for the backward, and one chunk's activations while it is recomputed.
        per_microbatch = math.ceil(layers / chunk) * inputs + min(chunk, layers) * per_layer
    else:
        per_microbatch = layers * per_layer
    in_flight = min(max(args.pipe_parallel_size, 1), args.gradient_accumulation_steps or 1)
    # The embedding's output, kept by its dropout (which the first stage applies).
    embedding = micro * args.seq_length * args.hidden_size * _dtype_bytes(args)
    return (per_microbatch + (embedding if args.hidden_dropout > 0 else 0)) * in_flight


def lstm_layer_activation_bytes(args: Any, micro: int) -> float:
    """One nn.LSTM layer: 17 values of hidden_size per token, as PyTorch's CPU kernel keeps
    them (each step's input, gates before and after their activations, cell state and its
    tanh, output); cuDNN's reserve space on CUDA is of the same order."""
    return micro * args.seq_length * args.hidden_size * _dtype_bytes(args) * 17


def estimate_memory(args: Any, micro: int | None = None) -> MemoryEstimate:
    """The estimate for ``args`` (a validated config with its padded vocabulary) at micro-batch
    ``micro`` (default: the config's)."""
    micro = micro or args.train_micro_batch_size_per_gpu
    dp, stage = max(args.data_parallel_size or 1, 1), args.zero_stage or 0
    params = parameters_per_gpu(args)
    size = _dtype_bytes(args)
    checkpointed = bool(args.checkpoint_activations)
    return MemoryEstimate(
        weights=params * size / (dp if stage >= 3 else 1),
        gradients=params * size / (dp if stage >= 2 else 1),
        optimizer=params * 4 * optimizer_state_values(args) / (dp if stage >= 1 else 1),
        activations=activation_bytes(args, micro, checkpointed),
        logits=logits_bytes(args, micro),
        checkpointed=checkpointed,
    )


def memory_report(args: Any, device_memory: int | None) -> str:
    """The estimate as aligned lines, with the other checkpointing choice and a verdict."""
    estimate = estimate_memory(args)
    rows = [("micro-batch per GPU", str(args.train_micro_batch_size_per_gpu)), *estimate.table()]
    other = activation_bytes(args, args.train_micro_batch_size_per_gpu, not estimate.checkpointed)
    other_name = "without" if estimate.checkpointed else "with"
    rows.append((f"(activations {other_name} checkpoint_activations)", format_bytes(other)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    if device_memory:
        lines.append(verdict(estimate.total, device_memory))
    return "\n".join(lines)


def verdict(need: float, have: int) -> str:
    if need <= have:
        return f"fits: need {format_bytes(need)} of {format_bytes(have)}"
    return f"does not fit: need {format_bytes(need)}, have {format_bytes(have)}"
