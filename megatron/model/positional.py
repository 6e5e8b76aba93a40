"""Positional embeddings (NeoX's ``pos_emb``): a registry of where each kind enters the model.

A kind may add a vector to the token embeddings (learned, sinusoidal), rotate queries and keys
(rotary) or bias attention scores by key distance (ALiBi, given as one slope per head so that
every attention backend can apply it natively).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.config import ModelConfig
from megatron.mpu.layers import InitMethod, partitioned_parameter
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.rules import register_names, register_rule
from megatron.registry import Registry


@dataclass(frozen=True)
class PosEmb:
    """The hooks of one positional-embedding kind; a hook left None is not used.

    ``embedding(config, init_method)``: a module mapping position ids [b or 1, s] to
    [.., s, h], added to the token embeddings. ``query_key(config, head_dim)``: a module with
    ``forward(q, k, position_ids) -> (q, k)`` applied before the KV cache.
    ``alibi_slopes(config)``: the slopes of all ``num_attention_heads`` heads (the score of key j for query i is lowered by
    slope * (i - j)).
    """

    embedding: Callable[[ModelConfig, InitMethod], nn.Module] | None = None
    query_key: Callable[[ModelConfig, int], nn.Module] | None = None
    alibi_slopes: Callable[[ModelConfig], torch.Tensor] | None = None


POS_EMBS: Registry[PosEmb] = Registry(
    "positional embedding", register_with="megatron.model.positional.register_pos_emb"
)
register_names("pos_emb", POS_EMBS)

# NeoX values Strata knows but does not implement, with what they are.
UNSUPPORTED_POS_EMBS = {"rpe": "T5 relative position buckets"}


def register_pos_emb(name: str, pos_emb: PosEmb) -> None:
    """Make ``pos_emb: <name>`` use ``pos_emb``'s hooks."""
    POS_EMBS.register(name, pos_emb)


def get_pos_emb(config: ModelConfig) -> PosEmb:
    name = config.pos_emb
    if name in UNSUPPORTED_POS_EMBS and name not in POS_EMBS:
        raise ValueError(
            f"pos_emb: {name!r} ({UNSUPPORTED_POS_EMBS[name]}) is not supported yet; expected "
            f"one of {POS_EMBS.choices()}"
        )
    return POS_EMBS.get(name, key="pos_emb")


def build_embedding_positions(config: ModelConfig, init_method: InitMethod) -> nn.Module | None:
    factory = get_pos_emb(config).embedding
    return None if factory is None else factory(config, init_method)


def build_query_key_positions(config: ModelConfig, head_dim: int) -> nn.Module | None:
    factory = get_pos_emb(config).query_key
    return None if factory is None else factory(config, head_dim)


def build_alibi_slopes(config: ModelConfig) -> torch.Tensor | None:
    factory = get_pos_emb(config).alibi_slopes
    return None if factory is None else factory(config)


# ------------------------------------------------------------------------------------ rotary


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GPT-NeoX convention: the rotated pairs are (i, i + d/2), not adjacent channels.
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _linear_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Position interpolation: position p is rotated as p / factor.
    return inv_freq / float(scaling["factor"])


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    # 0 for wavelengths longer than context / low, 1 for shorter than context / high.
    ramp = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq / factor * (1.0 - ramp) + inv_freq * ramp


# rope_type -> (keys it needs, inverse-frequency transform); Hugging Face's `rope_scaling` names.
ROPE_SCALINGS: dict[
    str, tuple[tuple[str, ...], Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]]
] = {
    "linear": (("factor",), _linear_scaling),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        _llama3_scaling,
    ),
}


def rope_scaling_problems(scaling: Any) -> list[str]:
    """What is wrong with a ``rope_scaling`` dict (empty when it is usable)."""
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be a dict with a rope_type, got {scaling!r}"]
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALINGS:
        return [
            f"rope_scaling: rope_type {kind!r} is not supported; expected {sorted(ROPE_SCALINGS)}"
        ]
    problems = []
    needed = ROPE_SCALINGS[kind][0]
    for key in needed:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            problems.append(f"rope_scaling: {kind} needs {key} > 0, got {value!r}")
    unknown = sorted(set(scaling) - set(needed) - {"rope_type", "type"})
    if unknown:
        problems.append(f"rope_scaling: unknown keys {unknown} for rope_type {kind!r}")
    if (
        not problems
        and kind == "llama3"
        and scaling["low_freq_factor"] >= scaling["high_freq_factor"]
    ):
        problems.append("rope_scaling: llama3 needs low_freq_factor < high_freq_factor")
    return problems


@register_rule("pos_emb")
def _check_config(args: Any, problems: Problems) -> None:
    name, where = args.pos_emb, args.where("pos_emb")
    if name in UNSUPPORTED_POS_EMBS and name not in POS_EMBS:
        problems.add(
            f"pos_emb={name!r}{where} ({UNSUPPORTED_POS_EMBS[name]}) is not supported yet; use "
            f"one of {POS_EMBS.choices()}"
        )
    if args.rope_scaling is not None:
        if name != "rotary":
            problems.add(f"rope_scaling{args.where('rope_scaling')} needs pos_emb rotary")
        for problem in rope_scaling_problems(args.rope_scaling):
            problems.add(f"{problem}{args.where('rope_scaling')}")


def rope_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies of the ``dim / 2`` rotated channel pairs (fp32)."""
    # fp32 as in Hugging Face, so converted models rotate by bit-identical angles.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling:
        problems = rope_scaling_problems(scaling)
        if problems:
            raise ValueError("; ".join(problems))
        kind = scaling.get("rope_type", scaling.get("type"))
        inv_freq = ROPE_SCALINGS[kind][1](inv_freq, scaling)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first ``dim`` channels of each head."""

    def __init__(
        self, dim: int, base: float, max_seq_len: int, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if dim <= 0 or dim % 2 != 0:
            raise ValueError(
                f"rotary_pct gives {dim} rotary channels per head; expected a positive even number"
            )
        self.dim = dim
        self.max_seq_len = max_seq_len
        # Plain attributes, not buffers: they stay fp32 when the model is cast to bf16/fp16 and
        # stay out of checkpoints (rotary_save_freqs_buffer is only a hint).
        self.inv_freq = rope_inv_freq(dim, base, scaling)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return torch.cat((freqs, freqs), dim=-1)

    def _table_cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """cos and sin of positions 0..length-1 ([length, dim], fp32), kept between calls."""
        table = self._table
        if table is None or table[0].device != device or table[0].size(0) < length:
            angles = self._angles(torch.arange(max(length, self.max_seq_len), device=device))
            table = self._table = (angles.cos(), angles.sin())
        return table[0][:length], table[1][:length]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [b, heads, s, head_dim] and k [b, kv_heads, s, head_dim]; ``position_ids``
        [b or 1, s] default to 0..s-1."""
        if position_ids is None:
            cos, sin = self._table_cos_sin(q.size(2), q.device)
        else:  # computed, not looked up: no device sync to size a table
            angles = self._angles(position_ids).unsqueeze(1)  # broadcast over heads
            cos, sin = angles.cos(), angles.sin()
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def _rotary(config: ModelConfig, head_dim: int) -> RotaryEmbedding:
    return RotaryEmbedding(
        int(head_dim * config.rotary_pct),
        config.rotary_emb_base,
        config.max_position_embeddings,
        config.rope_scaling,
    )


# ------------------------------------------------------------------- absolute embeddings


class LearnedPositionEmbedding(nn.Module):
    """Absolute positions 0..max_positions-1, replicated on every tensor-parallel rank."""

    def __init__(
        self,
        max_positions: int,
        hidden_size: int,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.weight = partitioned_parameter(
            (max_positions, hidden_size), None, init_method, params_dtype
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(position_ids, self.weight)


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed [sin(p w_i), cos(p w_i)] features (Vaswani et al.), w_i = 10000^(-2i/h)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"pos_emb sinusoidal needs an even hidden_size, got {hidden_size}")
        self.dtype = dtype
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, hidden_size, 2).float() / hidden_size))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return torch.cat((angles.sin(), angles.cos()), dim=-1).to(self.dtype)


# ------------------------------------------------------------------------------------ ALiBi


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.'s geometric slopes; for a head count that is not a power of two, those of
    the next lower power of two followed by every other slope of twice that count."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower)
    if lower < num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


register_pos_emb("none", PosEmb())
register_pos_emb("rotary", PosEmb(query_key=_rotary))
register_pos_emb(
    "learned",
    PosEmb(
        embedding=lambda config, init: LearnedPositionEmbedding(
            config.max_position_embeddings, config.hidden_size, init, config.params_dtype
        )
    ),
)
register_pos_emb(
    "sinusoidal",
    PosEmb(
        embedding=lambda config, init: SinusoidalPositionEmbedding(
            config.hidden_size, config.params_dtype
        )
    ),
)
register_pos_emb(
    "alibi", PosEmb(alibi_slopes=lambda config: alibi_slopes(config.num_attention_heads))
)
