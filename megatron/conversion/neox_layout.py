"""GPT-NeoX's native (DeepSpeed) checkpoint layout: names, layer numbering and tensor-parallel
shards, declared once and used by tools/ckpts/export_neox.py and tools/ckpts/import_neox.py.

A NeoX model is a sequence of layers; DeepSpeed numbers them as GPT-NeoX builds them:

    0        the embedding                  word_embeddings.weight
    1        (a parameterless pre-block step)
    2 .. L+1 the transformer blocks         input_layernorm.*, attention.*, mlp.*, ...
    L+2      (a parameterless post-block step)
    L+3      the final norm                 norm.weight / norm.bias (layernorm), norm.scale (rmsnorm)
    L+4      the output head                final_linear.weight (absent when the embedding is tied)

The sequential layout stores every layer of one tensor-parallel rank in
`mp_rank_{tp:02}_model_states.pt` under "module", named `sequential.{layer}.{name}`; the
pipeline layout stores `layer_{layer:02}-model_{tp:02}-model_states.pt`, the layer's own
state dict. Each rank holds its shard of a tensor, as GPT-NeoX's tensor-parallel layers cut it:

    rows        column-parallel weights and biases, the embedding and head: row blocks
    columns     row-parallel weights: column blocks
    row bias    row-parallel biases: NeoX's converter sums the ranks' copies, so each rank holds
                bias / tp
    replicated  norms: every rank holds the whole tensor (NeoX's converter averages them)
    qkv         attention.query_key_value: with as many key/value heads as query heads, per
                head [q; k; v] rows (the rank's heads, in order); with grouped-query attention,
                [q of the rank's heads; k of its key/value heads; v of them] (GPT-NeoX releases
                with the older MLP names instead gave each query head its q rows followed by
                an equal share of the rank's k rows and of its v rows: read as such)
    gated       mlp.linear1 of a gated MLP (SwiGLU, GEGLU): the rank's [up; gate] rows, the other
                order from Strata's and Hugging Face's [gate; up]

Strata's full tensors are those of `GPTModel(config)` at tensor-parallel size 1 (the fused
attention rows grouped per key/value head: megatron/conversion/layouts.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron.conversion.hf_config import ConversionError
from megatron.conversion.layouts import Dims

ROWS, COLUMNS, ROW_BIAS, REPLICATED, QKV, GATED = (
    "rows",
    "columns",
    "row bias",
    "replicated",
    "qkv",
    "gated",
)
NORM_PARAMS = {"layernorm": {"weight": "weight", "bias": "bias"}, "rmsnorm": {"weight": "scale"}}
# Tensors NeoX checkpoints hold that are not parameters.
IGNORED = re.compile(r"(attention\.rotary_emb\.inv_freq|attention\.(masked_)?bias|.*_extra_state)")


def embedding_layer() -> int:
    return 0


def block_layer(i: int) -> int:
    return i + 2


def final_norm_layer(num_layers: int) -> int:
    return num_layers + 3


def head_layer(num_layers: int) -> int:
    return num_layers + 4


def sequential_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


@dataclass(frozen=True)
class Place:
    """Where one Strata parameter lives in a NeoX checkpoint."""

    layer: int
    name: str  # within the layer
    kind: str


def place(strata_name: str, config) -> Place:
    """The NeoX layer, name and shard kind of a Strata parameter; a ConversionError for a
    parameter NeoX's layout has no place for."""
    norms = NORM_PARAMS.get(config.norm)
    gated = _is_gated(config.activation)
    if strata_name == "embedding.word_embeddings.weight":
        return Place(embedding_layer(), "word_embeddings.weight", ROWS)
    if strata_name == "lm_head.weight":
        return Place(head_layer(config.num_layers), "final_linear.weight", ROWS)
    found = re.fullmatch(r"final_norm\.norm\.(weight|bias)", strata_name)
    if found and norms and found.group(1) in norms:
        return Place(
            final_norm_layer(config.num_layers), f"norm.{norms[found.group(1)]}", REPLICATED
        )
    found = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", strata_name)
    if found:
        layer, module, param = block_layer(int(found.group(1))), found.group(2), found.group(3)
        if module in ("input_layernorm", "post_attention_layernorm") and norms:
            if param in norms:
                return Place(layer, f"{module}.{norms[param]}", REPLICATED)
        elif module == "attention.query_key_value":
            return Place(layer, f"{module}.{param}", QKV)
        elif module == "attention.dense":
            return Place(layer, f"{module}.{param}", COLUMNS if param == "weight" else ROW_BIAS)
        elif module == "mlp.dense_h_to_4h":
            return Place(layer, f"mlp.linear1.{param}", GATED if gated else ROWS)
        elif module == "mlp.dense_4h_to_h":
            return Place(layer, f"mlp.linear2.{param}", COLUMNS if param == "weight" else ROW_BIAS)
    raise ConversionError(
        f"Strata parameter {strata_name} has no place in a GPT-NeoX checkpoint (norm "
        f"{config.norm!r}: NeoX checkpoints hold layernorm and rmsnorm models with rotary or no "
        "position embeddings)"
    )


def _is_gated(activation: str) -> bool:
    from megatron.model.activations import is_gated

    return is_gated(activation)


def check_tensor_parallel(dims: Dims, tp: int, ffn: int, rows: int) -> None:
    """NeoX cuts heads, key/value heads, the MLP width and the vocabulary evenly."""
    for what, size in (
        ("num_attention_heads", dims.heads),
        ("num_kv_heads", dims.kv_heads),
        ("the MLP width", ffn),
        ("the padded vocabulary", rows),
    ):
        if size % tp:
            raise ConversionError(
                f"tensor-parallel size {tp} does not divide {what} ({size}): pick a size that does"
            )


# --------------------------------------------------------------------------- one tensor's shards


def to_shards(full: torch.Tensor, kind: str, dims: Dims, tp: int) -> list[torch.Tensor]:
    """The `tp` NeoX shards of a full Strata tensor."""
    if kind == ROWS:
        return list(full.chunk(tp, dim=0))
    if kind == COLUMNS:
        return list(full.chunk(tp, dim=1))
    if kind == REPLICATED:
        return [full] * tp
    if kind == ROW_BIAS:
        return [full / tp] * tp
    if kind == GATED:
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([u, g]) for u, g in zip(up.chunk(tp), gate.chunk(tp))]
    if kind == QKV:
        return _qkv_to_shards(full, dims, tp)
    raise ValueError(kind)


def from_shards(shards: list[torch.Tensor], kind: str, dims: Dims) -> torch.Tensor:
    """The full Strata tensor of NeoX's shards (one per tensor-parallel rank)."""
    if kind == ROWS:
        return torch.cat(shards, dim=0)
    if kind == COLUMNS:
        return torch.cat(shards, dim=1)
    if kind == REPLICATED:
        return shards[0] if len(shards) == 1 else torch.stack(shards).mean(dim=0)
    if kind == ROW_BIAS:
        return shards[0] if len(shards) == 1 else torch.stack(shards).sum(dim=0)
    if kind == GATED:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[1] for h in halves] + [h[0] for h in halves])
    if kind == QKV:
        return _qkv_from_shards(shards, dims)
    raise ValueError(kind)


def _grouped(full: torch.Tensor, dims: Dims) -> torch.Tensor:
    # Strata's rows: [kv_heads, heads_per_kv + 2, head_dim] (queries, key, value per group)
    group = dims.heads // dims.kv_heads
    return full.reshape(dims.kv_heads, group + 2, dims.head_dim, *full.shape[1:])


def _qkv_to_shards(full: torch.Tensor, dims: Dims, tp: int) -> list[torch.Tensor]:
    rest = full.shape[1:]
    if dims.kv_heads == dims.heads:
        # Strata's grouped rows are then NeoX's per-head [q; k; v] rows: cut by heads.
        return list(full.chunk(tp, dim=0))
    group = dims.heads // dims.kv_heads
    shards = []
    for part in _grouped(full, dims).chunk(tp, dim=0):  # the rank's key/value heads
        q, k, v = part.split([group, 1, 1], dim=1)
        shards.append(torch.cat([t.reshape(-1, *rest) for t in (q, k, v)]))
    return shards


def legacy_gqa_to_blocked(shard: torch.Tensor, dims: Dims, tp: int) -> torch.Tensor:
    """One rank's grouped-query rows of older GPT-NeoX releases ([q; k share; v share] per
    query head) as today's [q; k; v] blocks."""
    heads_r, kv_r, hd = dims.heads // tp, dims.kv_heads // tp, dims.head_dim
    share = kv_r * hd // heads_r
    rest = shard.shape[1:]
    per_head = shard.reshape(heads_r, hd + 2 * share, *rest)
    q, k, v = per_head.split([hd, share, share], dim=1)
    return torch.cat([t.reshape(-1, *rest) for t in (q, k, v)])


def _qkv_from_shards(shards: list[torch.Tensor], dims: Dims) -> torch.Tensor:
    if dims.kv_heads == dims.heads:
        return torch.cat(shards, dim=0)
    tp, group, hd = len(shards), dims.heads // dims.kv_heads, dims.head_dim
    kv_r = dims.kv_heads // tp
    parts = []
    for shard in shards:
        rest = shard.shape[1:]
        q, k, v = shard.split([kv_r * group * hd, kv_r * hd, kv_r * hd])
        q = q.reshape(kv_r, group, hd, *rest)
        k, v = (t.reshape(kv_r, 1, hd, *rest) for t in (k, v))
        parts.append(torch.cat([q, k, v], dim=1))
    return torch.cat(parts).reshape(-1, *shards[0].shape[1:])


# ------------------------------------------------------------------------------ whole models


def rotary_inv_freq(config) -> torch.Tensor | None:
    """The `attention.rotary_emb.inv_freq` buffer GPT-NeoX's blocks save (None without RoPE)."""
    if config.pos_emb != "rotary":
        return None
    head_dim = config.hidden_size // config.num_attention_heads
    dim = head_dim if config.rotary_pct == 1 else int(head_dim * config.rotary_pct)
    return 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2).float() / dim))


def to_neox_layers(
    tensors: Mapping[str, torch.Tensor], config, dims: Dims, tp: int
) -> dict[int, list[dict[str, torch.Tensor]]]:
    """NeoX layer number -> per tensor-parallel rank, that layer's state dict."""
    layers: dict[int, list[dict[str, torch.Tensor]]] = {}
    for name, full in tensors.items():
        where = place(name, config)
        shards = to_shards(full, where.kind, dims, tp)
        ranks = layers.setdefault(where.layer, [{} for _ in range(tp)])
        for rank, shard in enumerate(shards):
            ranks[rank][where.name] = shard.contiguous().clone()
    inv_freq = rotary_inv_freq(config)
    if inv_freq is not None:
        for i in range(config.num_layers):
            for state in layers[block_layer(i)]:
                state["attention.rotary_emb.inv_freq"] = inv_freq.clone()
    return dict(sorted(layers.items()))


LEGACY_MLP = re.compile(r"mlp\.(dense_h_to_4h|dense_4h_to_h|w1|w2|w3)\..+")


def normalize_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One rank's layer state dict under today's names: older GPT-NeoX MLP names
    (dense_h_to_4h / dense_4h_to_h; LLaMA-style w1 (gate), w3 (up), w2 (down)) become
    mlp.linear1 / mlp.linear2; buffers are dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if IGNORED.fullmatch(name):
            continue
        name = name.replace("mlp.dense_h_to_4h.", "mlp.linear1.").replace(
            "mlp.dense_4h_to_h.", "mlp.linear2."
        )
        if name.startswith("mlp.w2."):
            name = "mlp.linear2." + name.removeprefix("mlp.w2.")
        if name.startswith(("mlp.w1.", "mlp.w3.")):
            continue
        out[name] = tensor
    for param in ("weight", "bias"):
        gate, up = state.get(f"mlp.w1.{param}"), state.get(f"mlp.w3.{param}")
        if gate is not None and up is not None:
            out[f"mlp.linear1.{param}"] = torch.cat([up, gate])
        elif gate is not None or up is not None:
            present = "w1" if gate is not None else "w3"
            out[f"mlp.{present}.{param}"] = gate if gate is not None else up
    return out


def from_neox_layers(
    layers: Mapping[int, list[dict[str, torch.Tensor]]],
    expected: Mapping[str, torch.Size],
    config,
    dims: Dims,
    source: str,
    moments: bool = False,
    legacy_gqa: bool = False,
) -> dict[str, torch.Tensor]:
    """Strata's full tensors of every expected parameter from NeoX layers (layer number -> per
    rank state dict, names already normalized); missing, misshapen or unused tensors are one
    error listing them all. `moments`: the tensors are optimizer moments, which a row-parallel
    bias's ranks share (each rank's copy sees the bias's whole gradient): they are averaged."""
    out, used, problems = {}, set(), []
    for name, shape in expected.items():
        where = place(name, config)
        kind = REPLICATED if moments and where.kind == ROW_BIAS else where.kind
        ranks = layers.get(where.layer)
        label = f"layer {where.layer} {where.name}"
        if not ranks or any(where.name not in state for state in ranks):
            problems.append(f"  {label}: missing (needed for {name}, {list(shape)})")
            continue
        used.add((where.layer, where.name))
        shards = [state[where.name] for state in ranks]
        try:
            if kind == QKV and legacy_gqa and dims.kv_heads != dims.heads:
                shards = [legacy_gqa_to_blocked(s, dims, len(shards)) for s in shards]
            tensor = from_shards(shards, kind, dims)
        except (RuntimeError, ValueError) as err:
            problems.append(f"  {label}: shards do not fit {name} {list(shape)} ({err})")
            continue
        rows_ok = name in ("embedding.word_embeddings.weight", "lm_head.weight") and (
            tuple(tensor.shape[1:]) == tuple(shape[1:])
        )
        if tuple(tensor.shape) != tuple(shape) and not rows_ok:
            problems.append(
                f"  {label}: gives {list(tensor.shape)} for {name}, the config expects "
                f"{list(shape)}"
            )
            continue
        out[name] = tensor
    for layer, ranks in sorted(layers.items()):
        for key in sorted(ranks[0]):
            if (layer, key) not in used:
                problems.append(f"  layer {layer} {key}: not part of the configured model")
    if problems:
        raise ConversionError(
            f"{source} does not match the configured model:\n" + "\n".join(problems)
        )
    return out
