"""Attention (GQA/MQA, sliding window, QK norm, backends, KV cache) and positional embeddings."""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch
from _config_fixtures import small_config
from _model_fixtures import fixed_tokens, make_args

import megatron.model.attention_backends as attention_backends
from megatron.model import GPTModel, ModelConfig, count_parameters
from megatron.model.attention import SelfAttention
from megatron.model.attention_backends import AttentionOptions, FlashAttention, SDPAAttention
from megatron.model.kv_cache import KVCache
from megatron.model.positional import POS_EMBS, alibi_slopes, rope_inv_freq
from megatron.mpu import vocab_parallel_cross_entropy
from megatron.mpu.heads import kv_replicas, replicated_kv_row_order
from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.sizes import parameter_counts

pytestmark = pytest.mark.timeout(300)

HEADS, HIDDEN = 4, 64
HEAD_DIM = HIDDEN // HEADS


def _attention(seed: int = 0, **overrides) -> tuple[SelfAttention, object]:
    args = make_args(**overrides)
    torch.manual_seed(seed)
    attn = SelfAttention(
        ModelConfig.from_neox(args),
        lambda w: torch.nn.init.normal_(w, std=0.2),
        torch.nn.init.normal_,
    )
    with torch.no_grad():  # biases and norm weights start at 0 / 1: perturb so all are tested
        for param in attn.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return attn.eval(), args


def _hf_rotary(args, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [b, s, rotary_dim] from transformers' GPT-NeoX rotary embedding."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    config = transformers.GPTNeoXConfig(
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        rotary_pct=args.rotary_pct,
        rotary_emb_base=args.rotary_emb_base,
        max_position_embeddings=args.max_position_embeddings,
    )
    return GPTNeoXRotaryEmbedding(config)(torch.zeros(1), positions)


def reference_attention(
    attn: SelfAttention,
    args,
    x: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The documented computation written out head by head: QKV rows grouped per key/value
    head, rotary from transformers, explicit ALiBi bias, causal + window + mask, softmax."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    b, s, _ = x.shape
    heads = args.num_attention_heads
    kv_heads = args.num_kv_heads or heads
    group, d = heads // kv_heads, args.hidden_size // heads
    qkv = torch.nn.functional.linear(
        x, attn.query_key_value.weight, attn.query_key_value.bias
    ).view(b, s, kv_heads, group + 2, d)
    scale = 1 / (d * args.mup_attn_temp) if args.use_mup else 1 / math.sqrt(d)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = j <= i
    if args.sliding_window_width:
        allowed = allowed & (i - j < args.sliding_window_width)
    if mask is not None:
        allowed = allowed & mask
    slopes = alibi_slopes(heads) if args.pos_emb == "alibi" else torch.zeros(heads)
    outputs = []
    for h in range(heads):
        q, k, v = (
            qkv[:, :, h // group, h % group],
            qkv[:, :, h // group, group],
            qkv[:, :, h // group, group + 1],
        )
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if args.pos_emb == "rotary":
            cos, sin = _hf_rotary(args, positions.expand(b, s))
            q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
            q, k = q[:, 0], k[:, 0]
        scores = q @ k.transpose(-1, -2) * scale - slopes[h] * (i - j).clamp(min=0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        outputs.append(scores.softmax(-1) @ v)
    out = torch.cat(outputs, dim=-1)
    return torch.nn.functional.linear(out, attn.dense.weight, attn.dense.bias)


def _x(b: int = 2, s: int = 12) -> torch.Tensor:
    return torch.randn(b, s, HIDDEN, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_kv_heads": 2},
        {"num_kv_heads": 1, "pos_emb": "alibi"},
        {"num_kv_heads": 2, "sliding_window_width": 3, "rotary_pct": 1.0},
        {"pos_emb": "alibi", "sliding_window_width": 5},
        {"pos_emb": "none", "use_mup": True, "mup_attn_temp": 2.0},
        {"num_kv_heads": 2, "use_qk_layernorm": True},
        {"use_qk_layernorm": True, "norm": "rmsnorm", "use_bias_in_attn_linear": False},
    ],
    ids=["mha", "gqa", "mqa-alibi", "gqa-window", "alibi-window", "mup", "qknorm", "qk-rms"],
)
def test_attention_matches_head_by_head_reference(overrides) -> None:
    attn, args = _attention(**overrides)
    x = _x()
    positions = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_attention(attn, args, x, positions))
        # A block-causal mask (two packed documents) with restarted positions.
        docs = (torch.arange(12) >= 7).long()
        mask = (docs[:, None] == docs[None, :])[None, None]
        restarted = torch.where(docs.bool(), torch.arange(12) - 7, torch.arange(12))[None]
        torch.testing.assert_close(
            attn(x, restarted, mask), reference_attention(attn, args, x, restarted, mask[0, 0])
        )


def _mha_state_from_gqa(state: dict, args) -> dict:
    """The MHA state dict whose per-head keys/values are copies of the GQA group's."""
    heads, kv_heads = args.num_attention_heads, args.num_kv_heads
    group, d = heads // kv_heads, args.hidden_size // heads
    out = dict(state)
    for name, tensor in state.items():
        if "query_key_value" not in name:
            continue
        grouped = tensor.view(kv_heads, group + 2, d, *tensor.shape[1:])
        q = grouped[:, :group].reshape(heads, d, *tensor.shape[1:])
        k = grouped[:, group].repeat_interleave(group, dim=0)
        v = grouped[:, group + 1].repeat_interleave(group, dim=0)
        out[name] = torch.stack([q, k, v], dim=1).reshape(3 * heads * d, *tensor.shape[1:])
    return out


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_key_value_heads(kv_heads: int) -> None:
    gqa_args = make_args(num_kv_heads=kv_heads)
    gqa, mha = (
        GPTModel(ModelConfig.from_neox(gqa_args)).eval(),
        GPTModel(ModelConfig.from_neox(make_args())).eval(),
    )
    assert gqa.layers[0].attention.query_key_value.weight.shape == (
        (HEADS + 2 * kv_heads) * HEAD_DIM,
        HIDDEN,
    )
    mha.load_state_dict(_mha_state_from_gqa(gqa.state_dict(), gqa_args))
    tokens = fixed_tokens(gqa_args)
    s = tokens.size(1)
    mask = torch.ones(2, 1, s, s, dtype=torch.bool)
    mask[0, :, 9:, :9] = False  # two documents in the first row
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            gqa(tokens, attention_mask=mask), mha(tokens, attention_mask=mask), atol=1e-5, rtol=1e-5
        )


def test_sliding_window_equals_explicit_band_mask_and_matters() -> None:
    windowed = GPTModel(ModelConfig.from_neox(make_args(sliding_window_width=4))).eval()
    full = GPTModel(ModelConfig.from_neox(make_args())).eval()
    tokens = fixed_tokens(make_args())
    s = tokens.size(1)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    band = (i - j < 4)[None, None]
    docs = torch.zeros(2, 1, s, s, dtype=torch.bool)
    docs[:, :, :10, :10] = docs[:, :, 10:, 10:] = True
    with torch.no_grad():
        torch.testing.assert_close(windowed(tokens), full(tokens, attention_mask=band))
        torch.testing.assert_close(
            windowed(tokens, attention_mask=docs), full(tokens, attention_mask=docs & band)
        )
        assert not torch.allclose(windowed(tokens)[:, 4:], full(tokens)[:, 4:])
        # Within the first window nothing is cut off.
        torch.testing.assert_close(windowed(tokens)[:, :4], full(tokens)[:, :4])


# ------------------------------------------------------------------------- positional kinds


def test_rotary_matches_transformers_gpt_neox() -> None:
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    for pct in (0.25, 1.0):
        args = make_args(rotary_pct=pct)
        rotary = SelfAttention(
            ModelConfig.from_neox(args), torch.nn.init.normal_, torch.nn.init.normal_
        ).qk_positional
        q, k = torch.randn(2, 4, 9, HEAD_DIM), torch.randn(2, 2, 9, HEAD_DIM)
        positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 0, 1, 2, 30, 31, 40]])
        cos, sin = _hf_rotary(args, positions)
        want_q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        _, want_k = apply_rotary_pos_emb(k, k, cos, sin)
        got_q, got_k = rotary(q, k, positions)
        torch.testing.assert_close(got_q, want_q)
        torch.testing.assert_close(got_k, want_k)
        default_q, _ = rotary(q, k)  # positions 0..s-1
        torch.testing.assert_close(default_q[:1], got_q[:1])


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_rope_scaling_matches_transformers(scaling) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=16,
        max_position_embeddings=131072,
        rope_parameters={**scaling, "rope_theta": 500000.0},
    )
    want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    got = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got, rope_inv_freq(128, 500000.0))
    # The model uses it: a scaled model rotates differently.
    plain = GPTModel(ModelConfig.from_neox(make_args(rotary_pct=1.0))).eval()
    scaled = GPTModel(ModelConfig.from_neox(make_args(rotary_pct=1.0, rope_scaling=scaling))).eval()
    tokens = fixed_tokens(make_args())
    with torch.no_grad():
        assert not torch.allclose(plain(tokens), scaled(tokens))


def test_rope_scaling_errors() -> None:
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        GPTModel(
            ModelConfig.from_neox(make_args(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
        )
    with pytest.raises(ValueError, match="high_freq_factor > 0"):
        rope_inv_freq(16, 10000, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1})


def test_alibi_slopes_follow_press_et_al() -> None:
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # Not a power of two: the 4-head slopes, then every other slope of the 8-head set.
    torch.testing.assert_close(
        alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    )


def test_absolute_position_embeddings() -> None:
    positions = torch.tensor([[0, 3, 7]])
    sinusoidal = GPTModel(
        ModelConfig.from_neox(make_args(pos_emb="sinusoidal"))
    ).embedding.position_embeddings
    got = sinusoidal(positions)[0]
    for row, p in enumerate((0, 3, 7)):
        for c in (0, 5, HIDDEN // 2 - 1):
            angle = p / 10000 ** (2 * c / HIDDEN)
            assert got[row, c].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert got[row, HIDDEN // 2 + c].item() == pytest.approx(math.cos(angle), abs=1e-6)
    learned = GPTModel(
        ModelConfig.from_neox(make_args(pos_emb="learned"))
    ).embedding.position_embeddings
    torch.testing.assert_close(learned(positions)[0], learned.weight[[0, 3, 7]])
    # No state: sinusoidal positions add no parameters and nothing to checkpoints.
    assert not any(
        "position" in k
        for k in GPTModel(ModelConfig.from_neox(make_args(pos_emb="sinusoidal"))).state_dict()
    )


@pytest.mark.parametrize("pos_emb", sorted(POS_EMBS))
def test_every_pos_emb_builds_and_trains(pos_emb: str) -> None:
    args = make_args(pos_emb=pos_emb, rotary_pct=0.5)
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = fixed_tokens(args, batch=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(2):
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[1] != losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_parameter_count_matches_config_formula() -> None:
    for overrides in (
        {"num_kv_heads": 2, "use_qk_layernorm": True},
        {"num_kv_heads": 1, "use_qk_layernorm": True, "norm": "rmsnorm", "pos_emb": "sinusoidal"},
    ):
        args = make_args(**overrides)
        model = GPTModel(ModelConfig.from_neox(args))
        assert count_parameters(model) == parameter_counts(args)["total"]
        assert "layers.0.attention.q_norm.weight" in model.state_dict()


# -------------------------------------------------------------------------------- KV cache


def _padded_batch(args, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, position ids and [b, 1, s, s] mask of a batch whose first row is left-padded."""
    tokens = fixed_tokens(args)[:, :-1]
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[0, :pad] = False
    tokens = tokens.masked_fill(~real, 0)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return tokens, positions, real[:, None, None, :].expand(-1, 1, tokens.size(1), -1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_kv_heads": 2},
        {"num_kv_heads": 1, "sliding_window_width": 4},
        {"pos_emb": "alibi", "num_kv_heads": 2},
        {"pos_emb": "alibi", "sliding_window_width": 3},
        {"pos_emb": "learned", "use_qk_layernorm": True},
        {"rotary_pct": 0.5, "sliding_window_width": 5},
    ],
    ids=["mha", "gqa", "mqa-window", "alibi-gqa", "alibi-window", "learned-qknorm", "rotary-half"],
)
def test_cached_decoding_matches_full_forward(overrides) -> None:
    args = make_args(**overrides)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    tokens, positions, mask = _padded_batch(args, pad=3)
    s = tokens.size(1)
    with torch.no_grad():
        full = model(tokens, positions, mask)
        cache = KVCache(max_length=8)  # grows past 8 on the way
        steps = [model(tokens[:, :6], positions[:, :6], mask[:, :, :6, :6], kv_cache=cache)]
        # A chunk of several tokens after the prefill, then one token at a time.
        steps.append(model(tokens[:, 6:9], positions[:, 6:9], mask[:, :, 6:9, :9], cache))
        for t in range(9, s):
            steps.append(
                model(
                    tokens[:, t : t + 1],
                    positions[:, t : t + 1],
                    mask[:, :, t : t + 1, : t + 1],
                    cache,
                )
            )
        assert cache.length == s
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

        # Unpadded, with default positions (cache.length + 0..n-1) and no mask.
        cache = KVCache()
        steps = [model(tokens[:, :5], kv_cache=cache)]
        steps += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(5, s)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(tokens), atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_the_real_tokens() -> None:
    args = make_args(num_kv_heads=2, pos_emb="alibi", sliding_window_width=6)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    tokens, positions, mask = _padded_batch(args, pad=4)
    with torch.no_grad():
        padded = model(tokens, positions, mask)[0, 4:]
        alone = model(tokens[:1, 4:])[0]
    assert torch.isfinite(model(tokens, positions, mask)).all()
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_cache_mask_shape_is_checked() -> None:
    model = GPTModel(ModelConfig.from_neox(make_args())).eval()
    tokens = fixed_tokens(make_args())
    cache = KVCache()
    with torch.no_grad():
        model(tokens[:, :4], kv_cache=cache)
        with pytest.raises(ValueError, match=r"expected \(1, 5\)"):
            model(
                tokens[:, 4:5],
                attention_mask=torch.ones(2, 1, 1, 4, dtype=torch.bool),
                kv_cache=cache,
            )


# -------------------------------------------------------------------------------- backends


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"attention_backend": "flash"}, "flash-attn"),
        ({"attention_backend": "te"}, "transformer-engine"),
        ({"te_mha": True}, "transformer-engine"),
        ({"attention_config": ["global", "flash"]}, "flash-attn"),
    ],
)
def test_missing_backend_package_is_a_clear_error(overrides, match) -> None:
    for module in ("flash_attn", "transformer_engine"):
        if importlib.util.find_spec(module) is not None:
            pytest.skip(f"{module} is installed")
    with pytest.raises(ImportError, match=f"{match}.*attention_backend: sdpa"):
        GPTModel(ModelConfig.from_neox(make_args(**overrides)))


def test_config_checks_attention_keys() -> None:
    def problems(**overrides) -> str:
        with pytest.raises(ConfigError) as info:
            NeoXArgs.from_dict(small_config(**overrides), check_files=False)
        return str(info.value)

    assert "te_mha" in problems(te_mha=True, attention_backend="flash")
    assert "attention_backend" in problems(attention_backend="cudnn")
    assert "not supported yet" in problems(pos_emb="rpe")
    assert "multiple of num_kv_heads" in problems(num_kv_heads=3)
    assert "sliding_window_width must be >= 1" in problems(sliding_window_width=0)
    assert "needs pos_emb rotary" in problems(
        pos_emb="alibi", rope_scaling={"rope_type": "linear", "factor": 2}
    )
    assert "low_freq_factor < high_freq_factor" in problems(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8,
            "low_freq_factor": 4,
            "high_freq_factor": 1,
            "original_max_position_embeddings": 8192,
        }
    )
    args = NeoXArgs.from_dict(
        small_config(
            num_kv_heads=2,
            sliding_window_width=8,
            use_qk_layernorm=True,
            pos_emb="alibi",
            attention_config=[[["global"], "all"]],
            norm="rmsnorm",
        )
    )  # the bytes tokenizer needs no files, so the vocabulary is padded and sizes derived
    assert args.attention_config == ["global", "global"]
    model = GPTModel(ModelConfig.from_neox(args))
    assert count_parameters(model) == args.num_parameters
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, args.padded_vocab_size)


def test_ranks_share_key_value_heads_when_there_are_fewer_than_ranks() -> None:
    assert kv_replicas(kv_heads=4, heads=8, head_dim=16, tp=2) == 1
    assert kv_replicas(kv_heads=2, heads=8, head_dim=16, tp=4) == 2
    assert kv_replicas(kv_heads=1, heads=8, head_dim=16, tp=8) == 8
    for kv_heads, heads, head_dim, tp in [(3, 12, 8, 4), (2, 6, 8, 4), (1, 8, 6, 4)]:
        with pytest.raises(ValueError, match=rf"num_kv_heads \({kv_heads}\)"):
            kv_replicas(kv_heads, heads, head_dim, tp)
    # One key/value head of 4 channels after 4 query heads, shared by 2 ranks: rank 0 holds
    # query heads 0-1 and channels 0-1 of the key and value, rank 1 the rest.
    order = replicated_kv_row_order(kv_heads=1, group=4, head_dim=4, replicas=2)
    assert sorted(order.tolist()) == list(range(24))
    assert order[:12].tolist() == [*range(8), 16, 17, 20, 21]
    assert order[12:].tolist() == [*range(8, 16), 18, 19, 22, 23]


def _fake_flash_module() -> types.ModuleType:
    """flash-attn 2's documented semantics in plain torch: [b, s, heads, d] tensors, causal
    aligned to the bottom right, window (left, right), ALiBi -slope * |i + sk - sq - j|,
    variable-length batches given by cumulative sequence lengths."""

    def dense(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        alibi_slopes=None,
    ):
        sq, sk, heads = q.size(1), k.size(1), q.size(2)
        k, v = (t.repeat_interleave(heads // t.size(2), dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale
        rel = torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            allowed &= rel >= 0
        if window_size[0] >= 0:
            allowed &= rel <= window_size[0]
        if alibi_slopes is not None:
            scores = scores - alibi_slopes.float()[:, None, None] * rel.abs()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        outs = []
        for n in range(len(cu_q) - 1):
            q_part = q[cu_q[n] : cu_q[n + 1]][None]
            k_part, v_part = (t[cu_k[n] : cu_k[n + 1]][None] for t in (k, v))
            assert q_part.size(1) <= max_q and k_part.size(1) <= max_k
            outs.append(dense(q_part, k_part, v_part, **kwargs)[0])
        return torch.cat(outs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = dense, varlen
    return module


@pytest.mark.parametrize(
    "window, alibi, kv_heads", [(None, False, 4), (3, False, 2), (None, True, 1), (4, True, 2)]
)
def test_flash_backend_matches_sdpa(monkeypatch, window, alibi, kv_heads) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module())
    options = AttentionOptions(
        num_heads=4,
        num_kv_heads=kv_heads,
        head_dim=8,
        scale=0.3,
        window=window,
        alibi_slopes=alibi_slopes(4) if alibi else None,
    )
    flash, sdpa = FlashAttention(options), SDPAAttention(options)
    gen = torch.Generator().manual_seed(0)
    b, s = 2, 10
    q = torch.randn(b, 4, s, 8, generator=gen).bfloat16().float()
    k, v = (torch.randn(b, kv_heads, s, 8, generator=gen).bfloat16().float() for _ in range(2))

    def check(q, k, v, mask):
        want = sdpa(q, k, v, mask, 0.0)
        got = flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.0).float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    check(q, k, v, None)
    # Packed documents (reset_attention_mask): the variable-length path.
    docs = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 2 + [2]])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    check(q, k, v, ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None])
    # Left padding, prefill and then cached decoding of the last 2 positions.
    real = torch.ones(b, s, dtype=torch.bool)
    real[1, :3] = False
    padding = real[:, None, None, :].expand(b, 1, s, s)
    check(q, k, v, padding)
    check(q[:, :, -2:], k, v, padding[:, :, -2:])
    with pytest.raises(ValueError, match="block-causal or left padding"):
        scattered = torch.rand(b, 1, s, s, generator=gen) > 0.5
        flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), scattered, 0.0)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        flash(q, k, v, None, 0.0)


# ------------------------------------------------------------- batched decoding fast paths


@pytest.mark.parametrize("alibi", [False, True], ids=["bool-mask", "alibi-bias"])
def test_sdpa_grouped_heads_with_a_mask_equal_repeated_heads(alibi: bool) -> None:
    kv_heads = 2
    options = dict(head_dim=8, scale=0.3, alibi_slopes=alibi_slopes(4) if alibi else None)
    gqa = SDPAAttention(AttentionOptions(num_heads=4, num_kv_heads=kv_heads, **options))
    mha = SDPAAttention(AttentionOptions(num_heads=4, num_kv_heads=4, **options))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 8, generator=gen)  # one new token over 9 cached keys
    k, v = (torch.randn(3, kv_heads, 10, 8, generator=gen) for _ in range(2))
    real = torch.ones(3, 10, dtype=torch.bool)
    real[1, :4] = real[2, :7] = False
    mask = real[:, None, None, :]
    want = mha(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), mask, 0.0)
    torch.testing.assert_close(gqa(q, k, v, mask, 0.0), want)
    assert not torch.allclose(gqa(q, k, v, None, 0.0), want)  # the mask matters


def test_one_forward_combines_its_mask_once(monkeypatch) -> None:
    args = make_args(num_kv_heads=2, num_layers=3)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    tokens, positions, mask = _padded_batch(args, pad=3)
    with torch.no_grad():
        want = model(tokens, positions, mask)
        calls = []
        original = attention_backends._allowed_keys
        monkeypatch.setattr(
            attention_backends,
            "_allowed_keys",
            lambda *a: calls.append(a[:2]) or original(*a),
        )
        torch.testing.assert_close(model(tokens, positions, mask), want, atol=0, rtol=0)
        assert len(calls) == 1  # not once per layer
        # The sharing ends with the forward: a mask changed in place is seen by the next one.
        mask = mask.clone()
        mask[1, :, :, :2] = False
        changed = model(tokens, positions, mask)
        assert len(calls) == 2
        assert not torch.allclose(changed[1], want[1])
        # A layer called on its own computes its own mask.
        model.layers[0](torch.randn(2, tokens.size(1), args.hidden_size), positions, mask)
        assert len(calls) == 3
