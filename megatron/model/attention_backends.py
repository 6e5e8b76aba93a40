"""Attention backends: the softmax(q k^T) v core, behind a registry.

Every backend computes the same function. Queries [b, heads, sq, d] are the last sq positions of
the keys/values [b, kv_heads, sk, d] (sk > sq when earlier positions come from a KV cache), so
query i sits at key index i + sk - sq. Attention is causal, limited to the last ``window`` keys
(the query's own included) when a sliding window is set, and further limited by an optional
boolean mask broadcastable to [b, 1, sq, sk] (True = may attend). Query head h reads key/value
head h // (heads / kv_heads). ALiBi lowers the score of key j for query i by slope_h * (i - j).

``sdpa`` (PyTorch's scaled_dot_product_attention) runs everywhere; ``flash`` (flash-attn 2) and
``te`` (Transformer Engine) are imported only when a layer uses them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.neox_arguments.rules import register_names
from megatron.registry import Registry


@dataclass(frozen=True)
class AttentionOptions:
    """The fixed settings of one layer's attention (head counts are this rank's)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    window: int | None = None
    alibi_slopes: torch.Tensor | None = None  # [num_heads] fp32
    dropout: float = 0.0  # attention_dropout, for backends that fix it at construction


# A backend is a module: forward(q, k, v, mask, dropout_p) -> [b, heads, sq, head_dim].
BackendFactory = Callable[[AttentionOptions], nn.Module]

ATTENTION_BACKENDS: Registry[BackendFactory] = Registry(
    "attention backend",
    register_with="megatron.model.attention_backends.register_attention_backend",
)
register_names("attention_backend", ATTENTION_BACKENDS)


def register_attention_backend(name: str, factory: BackendFactory) -> None:
    """Make ``attention_backend: <name>`` build ``factory(options)`` for each layer."""
    ATTENTION_BACKENDS.register(name, factory)


def build_attention_backend(name: str, options: AttentionOptions) -> nn.Module:
    return ATTENTION_BACKENDS.get(name, key="attention_backend")(options)


def layer_backend_name(args: Any, layer_number: int) -> str:
    """The backend of layer ``layer_number`` (0-based): NeoX's per-layer ``attention_config``
    type ``flash`` selects flash-attn; ``global`` layers use ``attention_backend`` (``te`` when
    NeoX's ``te_mha`` is set)."""
    types = args.attention_config
    kind = types[layer_number] if types else "global"
    if kind == "flash":
        return "flash"
    if kind != "global":
        raise ValueError(
            f"attention_config: layer {layer_number} has attention type {kind!r}; only global "
            "and flash attention are supported"
        )
    return "te" if args.te_mha else args.attention_backend


# Optional packages per backend: (import name, pip name).
OPTIONAL_PACKAGES = {
    "flash": ("flash_attn", "flash-attn"),
    "te": ("transformer_engine", "transformer-engine"),
}


def missing_package_error(backend: str) -> ImportError:
    module, pip_name = OPTIONAL_PACKAGES[backend]
    return ImportError(
        f"attention backend {backend!r} needs the {pip_name} package ({module}), which is not "
        f"installed: install it (pip install '.[gpu]' on a CUDA machine) or use the default "
        "backend: attention_backend: sdpa (and global instead of flash in attention_config)"
    )


def _import_optional(backend: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_package_error(backend) from exc


# ------------------------------------------------------------------------- shared helpers


def _distances(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, k_len] query index minus key index (queries are the last q_len positions)."""
    q_idx = torch.arange(k_len - q_len, k_len, device=device)
    return q_idx[:, None] - torch.arange(k_len, device=device)[None, :]


# Within shared_attention_masks(): (id(mask), q_len, k_len, window, device) -> (mask, allowed).
_SHARED_MASKS: ContextVar[dict[tuple, tuple] | None] = ContextVar("_SHARED_MASKS", default=None)


@contextmanager
def shared_attention_masks() -> Iterator[None]:
    """Compute ``allowed_keys`` once per mask and shape inside the block, not once per layer.

    A model forward passes the same ``attention_mask`` object to every layer, and the mask
    cannot change while the forward runs, so its combination with the causal (and window)
    limits is shared; each entry keeps its mask alive, so an id is never reused in the block.
    """
    if _SHARED_MASKS.get() is not None:  # nested: the outer block's entries stay valid
        yield
        return
    token = _SHARED_MASKS.set({})
    try:
        yield
    finally:
        _SHARED_MASKS.reset(token)


def allowed_keys(
    q_len: int,
    k_len: int,
    mask: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean [.., q_len, k_len]: causal, within the window, and allowed by ``mask``."""
    shared = _SHARED_MASKS.get()
    if shared is None:
        return _allowed_keys(q_len, k_len, mask, window, device)
    key = (id(mask), q_len, k_len, window, device)
    if key not in shared:
        shared[key] = (mask, _allowed_keys(q_len, k_len, mask, window, device))
    return shared[key][1]


def _allowed_keys(
    q_len: int,
    k_len: int,
    mask: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    dist = _distances(q_len, k_len, device)
    allowed = dist >= 0
    if window is not None:
        allowed = allowed & (dist < window)
    if mask is None:
        return allowed
    if mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be boolean (True = may attend), got {mask.dtype}")
    if tuple(mask.shape[-2:]) != (q_len, k_len):
        raise ValueError(
            f"attention_mask covers {tuple(mask.shape[-2:])} (queries, keys), expected "
            f"({q_len}, {k_len}): the new tokens by the cached plus new positions"
        )
    allowed = allowed & mask
    # A query allowed no key at all (a padding position) attends to itself instead, so its
    # softmax stays finite and NaNs cannot reach other positions through later layers.
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & (dist == 0))


def alibi_bias(slopes: torch.Tensor, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[heads, q_len, k_len] fp32: -slope * (query index - key index) for keys up to the query."""
    dist = _distances(q_len, k_len, device).clamp(min=0).float()
    return -slopes.to(device)[:, None, None] * dist


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.repeat_interleave(num_heads // x.size(1), dim=1)


def _native_gqa(masked: bool, device: torch.device) -> bool:
    """Whether SDPA reads the shared key/value heads itself rather than copies. With an explicit
    mask only on CPU, where the fused kernel is checked to take both (other devices keep the
    expanded heads their masked kernels are known to accept)."""
    return not masked or device.type == "cpu"


class SDPAAttention(nn.Module):
    """torch.nn.functional.scaled_dot_product_attention; an explicit mask only when needed."""

    def __init__(self, options: AttentionOptions) -> None:
        super().__init__()
        self.options = options

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        o = self.options
        q_len, k_len = q.size(2), k.size(2)
        attn_mask, is_causal = None, False
        if (
            mask is None
            and o.window is None
            and o.alibi_slopes is None
            and (q_len == k_len or q_len == 1)
        ):
            # Plain causal (or one new token that sees every cached key): SDPA's fused kernels.
            is_causal = q_len > 1
        else:
            allowed = allowed_keys(q_len, k_len, mask, o.window, q.device)
            attn_mask = allowed
            if o.alibi_slopes is not None:
                bias = alibi_bias(o.alibi_slopes, q_len, k_len, q.device)
                attn_mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        extra = {}
        if k.size(1) != q.size(1):
            if _native_gqa(attn_mask is not None, q.device):
                extra["enable_gqa"] = True
            else:  # the kernel wants as many key/value heads as query heads
                k, v = _expand_kv(k, q.size(1)), _expand_kv(v, q.size(1))
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=o.scale,
            **extra,
        )


# ------------------------------------------------------------------------------- flash-attn


def _segment_starts(allowed: torch.Tensor) -> torch.Tensor:
    """[b, sq] first allowed key of each query, checking that each query sees one contiguous
    run of keys ending at itself (block-causal documents or left padding)."""
    first = allowed.int().argmax(dim=-1)
    k_len = allowed.size(-1)
    keys = torch.arange(k_len, device=allowed.device)
    q_idx = torch.arange(k_len - allowed.size(-2), k_len, device=allowed.device)
    contiguous = (keys >= first[..., None]) & (keys <= q_idx[:, None])
    if not torch.equal(contiguous, allowed):
        raise ValueError(
            "attention backend flash: attention_mask must be block-causal or left padding "
            "(each query sees one run of keys ending at itself); use attention_backend: sdpa"
        )
    return first


class FlashAttention(nn.Module):
    """flash-attn 2 (fp16/bf16 on CUDA): dense causal calls, or variable-length calls for
    block-causal masks (reset_attention_mask) and left-padded batches."""

    def __init__(self, options: AttentionOptions) -> None:
        super().__init__()
        flash = _import_optional("flash", "flash_attn")
        self.func, self.varlen_func = flash.flash_attn_func, flash.flash_attn_varlen_func
        self.options = options

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend flash needs fp16 or bf16 activations, got {q.dtype}; use "
                "attention_backend: sdpa for fp32"
            )
        o = self.options
        kwargs: dict[str, Any] = {
            "dropout_p": dropout_p,
            "softmax_scale": o.scale,
            "causal": True,  # bottom-right aligned when sq < sk, as cached decoding needs
            "window_size": (-1, -1) if o.window is None else (o.window - 1, 0),
        }
        if o.alibi_slopes is not None:
            kwargs["alibi_slopes"] = o.alibi_slopes.to(q.device, torch.float32)
        # flash-attn's layout is [b, s, heads, d].
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if mask is None:
            out = self.func(q, k, v, **kwargs)
        else:
            out = self._varlen(q, k, v, mask, kwargs)
        return out.transpose(1, 2)

    def _varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        b, q_len, heads, d = q.shape
        k_len = k.size(1)
        if mask.dim() == 4 and mask.size(1) != 1:
            raise ValueError("attention backend flash: attention_mask must be [b, 1, sq, sk]")
        allowed = allowed_keys(q_len, k_len, mask, None, q.device)
        allowed = allowed.reshape(-1, q_len, k_len).expand(b, q_len, k_len)
        first = _segment_starts(allowed)
        device = q.device
        if q_len == k_len:
            # Packed documents: a segment starts where a query sees only itself and later ones.
            positions = torch.arange(q_len, device=device)
            is_start = first == positions
            seg_start = torch.where(is_start, positions, 0).cummax(dim=1).values
            if not torch.equal(first, seg_start):
                raise ValueError(
                    "attention backend flash: attention_mask must be block-causal (documents "
                    "that do not overlap); use attention_backend: sdpa"
                )
            starts = is_start.flatten().nonzero().flatten()
            cu = torch.cat([starts, starts.new_tensor([b * q_len])]).to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            out = self.varlen_func(
                q.reshape(b * q_len, heads, d),
                k.reshape(b * k_len, k.size(2), d),
                v.reshape(b * k_len, v.size(2), d),
                cu,
                cu,
                longest,
                longest,
                **kwargs,
            )
            return out.view(b, q_len, heads, d)
        # Cached decoding: each row's keys start after its left padding.
        row_start = first[:, :1]
        if not torch.equal(first, row_start.expand_as(first)):
            raise ValueError(
                "attention backend flash: with a KV cache, attention_mask may only mask left "
                "padding; use attention_backend: sdpa"
            )
        keep = (torch.arange(k_len, device=device)[None, :] >= row_start).flatten()
        lengths = (k_len - row_start.flatten()).to(torch.int32)
        cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * q_len, q_len, device=device, dtype=torch.int32)
        out = self.varlen_func(
            q.reshape(b * q_len, heads, d),
            k.reshape(b * k_len, k.size(2), d)[keep],
            v.reshape(b * k_len, v.size(2), d)[keep],
            cu_q,
            cu_k,
            q_len,
            int(lengths.max()),
            **kwargs,
        )
        return out.view(b, q_len, heads, d)


# ------------------------------------------------------------------------ Transformer Engine


class TEAttention(nn.Module):
    """Transformer Engine's DotProductAttention (fused cuDNN kernels)."""

    def __init__(self, options: AttentionOptions) -> None:
        super().__init__()
        te = _import_optional("te", "transformer_engine.pytorch")
        self.options = options
        # Kept out of the module tree: TE modules add an `_extra_state` entry to state dicts,
        # which must hold only Strata's canonical names.
        object.__setattr__(
            self,
            "te",
            te.DotProductAttention(
                options.num_heads,
                options.head_dim,
                num_gqa_groups=options.num_kv_heads,
                attention_dropout=options.dropout,
                qkv_format="bshd",
                softmax_scale=options.scale,
            ),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        o = self.options
        q_len, k_len = q.size(2), k.size(2)
        self.te.train(dropout_p > 0)  # its dropout (options.dropout) applies in training only
        kwargs: dict[str, Any] = {}
        if mask is None:
            kwargs["attn_mask_type"] = "causal" if q_len == k_len else "causal_bottom_right"
            if o.window is not None:
                kwargs["window_size"] = (o.window - 1, 0)
        else:
            # TE's masks are True where attention is NOT allowed.
            allowed = allowed_keys(q_len, k_len, mask, o.window, q.device)
            kwargs["attn_mask_type"] = "arbitrary"
            kwargs["attention_mask"] = ~allowed.reshape(-1, 1, q_len, k_len)
        if o.alibi_slopes is not None:
            kwargs["core_attention_bias_type"] = "alibi"
            kwargs["alibi_slopes"] = o.alibi_slopes.to(q.device, torch.float32)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        out = self.te(q, k, v, **kwargs)  # [b, sq, heads * d]
        return out.view(q.size(0), q_len, o.num_heads, o.head_dim).transpose(1, 2)


register_attention_backend("sdpa", SDPAAttention)
register_attention_backend("flash", FlashAttention)
register_attention_backend("te", TEAttention)
