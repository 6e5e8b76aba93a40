"""Architecture building blocks: norm / activation / init registries, gated MLPs, muP and the
shipped architecture configs (Pythia, Llama, Mistral, SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _model_fixtures import fixed_tokens, make_args
from conftest import REPO

import megatron.optimizers
from megatron.model import (
    ACTIVATIONS,
    INIT_METHODS,
    NORMS,
    GPTModel,
    ModelConfig,
    TransformerLayer,
    count_parameters,
)
from megatron.model.mlp import MLP
from megatron.model.norms import build_norm
from megatron.mpu import vocab_parallel_cross_entropy
from megatron.mpu.layers import merge_partitions, split_partition
from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.sizes import ffn_sizes, parameter_counts
from megatron.optimizers import build_optimizer
from megatron.tokenizer import pad_vocab_size
from tools import mup_coord_check

pytestmark = pytest.mark.timeout(180)

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def train_losses(args: SimpleNamespace, steps: int = 2) -> list[float]:
    """Loss before and after each of `steps` AdamW steps on one fixed batch (no DeepSpeed)."""
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = fixed_tokens(args, batch=4)
    losses = []
    for step in range(steps + 1):
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        losses.append(loss.item())
        if step < steps:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return losses


def assert_trains(losses: list[float]) -> None:
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------------- registries


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_trains(norm: str) -> None:
    args = make_args(norm=norm)
    if norm.startswith("te_") and not HAS_TE:
        with pytest.raises(ValueError, match="Transformer Engine, which is not installed"):
            GPTModel(ModelConfig.from_neox(args))
        return
    assert_trains(train_losses(args))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_trains(activation: str) -> None:
    assert_trains(train_losses(make_args(activation=activation)))


@pytest.mark.parametrize("method", sorted(INIT_METHODS))
def test_every_init_method_trains(method: str) -> None:
    assert_trains(train_losses(make_args(init_method=method, output_layer_init_method=method)))


def test_unknown_names_list_the_registered_ones() -> None:
    for key, registry in (("norm", NORMS), ("activation", ACTIVATIONS)):
        with pytest.raises(ValueError, match=f"{key}: unknown .*'nope'.*{sorted(registry)[0]}"):
            GPTModel(ModelConfig.from_neox(make_args(**{key: "nope"})))
    with pytest.raises(ValueError, match="output_layer_init_method: unknown init method 'nope'"):
        GPTModel(ModelConfig.from_neox(make_args(output_layer_init_method="nope")))


# --------------------------------------------------------------------------- norms


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)


def _perturbed_norm(**overrides) -> torch.nn.Module:
    norm = build_norm(ModelConfig.from_neox(make_args(**overrides)))
    with torch.no_grad():  # norms start at weight 1 / bias 0: move them so both are tested
        for param in norm.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return norm


def test_layernorm_matches_torch() -> None:
    norm = _perturbed_norm(norm="layernorm", layernorm_epsilon=1e-5)
    assert sorted(n for n, _ in norm.named_parameters()) == ["bias", "weight"]
    expected = F.layer_norm(_x(), (64,), norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(_x()), expected)
    no_bias = build_norm(
        ModelConfig.from_neox(make_args(norm="layernorm", use_bias_in_norms=False))
    )
    assert [n for n, _ in no_bias.named_parameters()] == ["weight"]


def test_rmsnorm_matches_formula_and_torch() -> None:
    norm = _perturbed_norm(norm="rmsnorm", rms_norm_epsilon=1e-6)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias, whatever the switch
    x = _x()
    manual = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), manual)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-6))
    # bf16 in, bf16 out, normalised in fp32 (as Hugging Face's LlamaRMSNorm)
    bf16 = build_norm(ModelConfig.from_neox(make_args(norm="rmsnorm", params_dtype=torch.bfloat16)))
    out = bf16(_x(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.rms_norm(_x(), (64,), eps=1e-8), atol=0.05, rtol=0.02)


def test_scalenorm_and_non_parametric_layernorm() -> None:
    norm = _perturbed_norm(norm="scalenorm", scalenorm_epsilon=1e-8)
    assert [(n, p.shape) for n, p in norm.named_parameters()] == [("weight", (1,))]
    x = _x()
    torch.testing.assert_close(norm(x), norm.weight * x / x.norm(dim=-1, keepdim=True))
    plain = build_norm(ModelConfig.from_neox(make_args(norm="non_parametric_layernorm")))
    assert list(plain.parameters()) == []
    torch.testing.assert_close(plain(x), F.layer_norm(x, (64,), eps=1e-5))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "scalenorm", "non_parametric_layernorm"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_model_parameter_count_matches_config_count(norm: str, activation: str) -> None:
    args = make_args(norm=norm, activation=activation, num_kv_heads=2, use_bias_in_mlp=False)
    assert (
        count_parameters(GPTModel(ModelConfig.from_neox(args))) == parameter_counts(args)["total"]
    )


def test_residual_layouts_and_bias_switches() -> None:
    x = _x()
    tied = TransformerLayer(
        ModelConfig.from_neox(
            make_args(
                gpt_j_residual=True,
                gpt_j_tied=True,
                use_bias_in_norms=False,
                use_bias_in_attn_linear=False,
                use_bias_in_mlp=False,
            )
        ),
        0,
    )
    assert tied.post_attention_layernorm is None
    assert not [name for name, _ in tied.named_parameters() if name.endswith("bias")]
    with torch.no_grad():
        normed = tied.input_layernorm(x)  # GPT-J: one norm feeds attention and MLP
        torch.testing.assert_close(tied(x), x + tied.attention(normed) + tied.mlp(normed))
        sequential = TransformerLayer(ModelConfig.from_neox(make_args()), 0)
        h = x + sequential.attention(sequential.input_layernorm(x))
        expected = h + sequential.mlp(sequential.post_attention_layernorm(h))
        torch.testing.assert_close(sequential(x), expected)


# --------------------------------------------------------------------------- gated MLPs


@pytest.mark.parametrize(
    ("overrides", "width"),
    [
        ({"hidden_size": 4096, "intermediate_size": 32768, "mlp_multiple_of": 256}, 11008),
        ({"hidden_size": 4096, "intermediate_size": 43008, "mlp_multiple_of": 256}, 14336),
        ({"hidden_size": 576, "intermediate_size": 4608, "mlp_multiple_of": 256}, 1536),
        ({"hidden_size": 64}, 85),  # 2/3 x 4 x 64 = 170, two halves of 85
        ({"hidden_size": 64, "mlp_multiple_of": 16}, 96),
        ({"hidden_size": 64, "expansion_factor": 6.0}, 128),  # int(6 x 64) = 384 -> 256 -> 128
    ],
)
def test_gated_width_rule(overrides: dict, width: int) -> None:
    args = make_args(activation="swiglu", **overrides)
    assert ffn_sizes(args) == (2 * width, width)
    ungated = make_args(**{**overrides, "mlp_multiple_of": 1})
    assert ffn_sizes(ungated)[1] == (
        ungated.intermediate_size or int((ungated.expansion_factor or 4) * ungated.hidden_size)
    )


def test_gated_mlp_layout_is_gate_then_up() -> None:
    """dense_h_to_4h rows are [gate; up]; out = down(act(gate) * up), as Hugging Face's LlamaMLP."""
    transformers = pytest.importorskip("transformers")
    args = make_args(activation="swiglu", intermediate_size=192, use_bias_in_mlp=False)
    mlp = MLP(ModelConfig.from_neox(args), torch.nn.init.normal_, torch.nn.init.normal_)
    f = 64
    assert mlp.dense_h_to_4h.weight.shape == (2 * f, 64)
    assert mlp.dense_4h_to_h.weight.shape == (64, f)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=f, hidden_act="silu")
    reference = transformers.models.llama.modeling_llama.LlamaMLP(config)
    with torch.no_grad():
        gate, up = mlp.dense_h_to_4h.weight.split(f)
        reference.gate_proj.weight.copy_(gate)
        reference.up_proj.weight.copy_(up)
        reference.down_proj.weight.copy_(mlp.dense_4h_to_h.weight)
        x = _x()
        torch.testing.assert_close(mlp(x), reference(x))


@pytest.mark.parametrize(
    ("activation", "gate_fn"),
    [
        ("geglu", F.gelu),
        ("reglu", F.relu),
        ("glu", torch.sigmoid),
        ("bilinear", lambda g: g),
    ],
)
def test_gated_activations_with_biases(activation: str, gate_fn) -> None:
    args = make_args(activation=activation, intermediate_size=96)
    mlp = MLP(ModelConfig.from_neox(args), torch.nn.init.normal_, torch.nn.init.normal_)
    with torch.no_grad():
        for bias in (mlp.dense_h_to_4h.bias, mlp.dense_4h_to_h.bias):
            bias.normal_()
        x = _x()
        h = x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias
        gate, up = h[..., :32], h[..., 32:]
        manual = (gate_fn(gate) * up) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
        torch.testing.assert_close(mlp(x), manual)


def test_strided_partitions_round_trip() -> None:
    full = torch.arange(24.0).view(8, 3)  # rows [gate (4); up (4)]
    parts = [split_partition(full, 0, 2, rank, stride=2) for rank in range(2)]
    torch.testing.assert_close(parts[0], full[[0, 1, 4, 5]])  # its half of gate, then of up
    torch.testing.assert_close(parts[1], full[[2, 3, 6, 7]])
    torch.testing.assert_close(merge_partitions(parts, 0, stride=2), full)
    plain = [split_partition(full, 1, 3, rank) for rank in range(3)]
    torch.testing.assert_close(merge_partitions(plain, 1), full)
    with pytest.raises(
        ValueError, match=r"\(8\) must be divisible by the tensor-parallel size \(4\)"
    ):
        split_partition(full, 0, 4, 0, stride=4)


# --------------------------------------------------------------------------- init methods


def test_single_residual_xavier_and_orthogonal_inits() -> None:
    h, n = 256, 4
    args = make_args(
        hidden_size=h, num_layers=n, output_layer_init_method="single_residual_scaled_normal"
    )
    layer = GPTModel(ModelConfig.from_neox(args)).layers[0]
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(0.02 / n**0.5, rel=0.03)

    xavier = GPTModel(
        ModelConfig.from_neox(make_args(hidden_size=h, init_method="xavier_normal"))
    ).layers[0]
    weight = xavier.mlp.dense_h_to_4h.weight  # [4h, h]
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (h + 4 * h)), rel=0.03)

    ortho = GPTModel(
        ModelConfig.from_neox(
            make_args(hidden_size=h, num_layers=n, init_method="scaled_orthogonal")
        )
    )
    w = ortho.layers[0].mlp.dense_h_to_4h.weight  # [4h, h]: W^T W = gain^2 I, gain^2 = 2 / layers
    torch.testing.assert_close(w.T @ w, torch.eye(h) * 2 / n, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- muP


def mup_args(width: int, **overrides) -> SimpleNamespace:
    args = make_args(hidden_size=width, use_mup=True, mup_base_width=64, no_weight_tying=True)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_mup_init_scales_with_width() -> None:
    m = 4
    model = GPTModel(ModelConfig.from_neox(mup_args(64 * m, mup_init_scale=1.5)))
    layer = model.layers[0]
    for hidden in (layer.attention.query_key_value.weight, layer.mlp.dense_h_to_4h.weight):
        assert hidden.std().item() == pytest.approx(1.5 * 0.02 / m**0.5, rel=0.03)
    assert model.embedding.word_embeddings.weight.std().item() == pytest.approx(0.03, rel=0.03)
    assert model.lm_head.weight.std().item() == pytest.approx(1.5 * 0.02 * m**0.5, rel=0.03)
    # small_init's width is the base width under muP: std sqrt(2 / (5 x 64)) / sqrt(m)
    small = GPTModel(ModelConfig.from_neox(mup_args(64 * m, init_method="small_init"))).layers[0]
    want = math.sqrt(2 / (5 * 64)) / m**0.5
    assert small.attention.query_key_value.weight.std().item() == pytest.approx(want, rel=0.03)


def test_mup_at_base_width_changes_only_the_multipliers() -> None:
    sp, mup = (
        GPTModel(ModelConfig.from_neox(make_args(no_weight_tying=True))),
        GPTModel(ModelConfig.from_neox(mup_args(64))),
    )
    for (name, a), (_, b) in zip(sp.named_parameters(), mup.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    tokens = fixed_tokens(make_args())
    hot = GPTModel(ModelConfig.from_neox(mup_args(64, mup_output_temp=2.0, mup_embedding_mult=1.0)))
    with torch.no_grad():
        torch.testing.assert_close(hot(tokens), 2 * mup(tokens))
        scaled = GPTModel(ModelConfig.from_neox(mup_args(64, mup_embedding_mult=3.0))).embedding(
            tokens
        )
        torch.testing.assert_close(scaled, 3 * mup.embedding(tokens))


def test_mup_optimizer_groups() -> None:
    args = mup_args(256, optimizer={"type": "Adam", "params": {}}, lr=1e-2, weight_decay=0.1)
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = build_optimizer(args, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    layer = model.layers[0]
    assert lr_of[id(layer.attention.query_key_value.weight)] == pytest.approx(1e-2 / 4)
    assert lr_of[id(layer.mlp.dense_4h_to_h.weight)] == pytest.approx(1e-2 / 4)
    for fixed in (
        model.embedding.word_embeddings.weight,
        model.lm_head.weight,
        layer.input_layernorm.weight,
        layer.mlp.dense_h_to_4h.bias,
    ):
        assert lr_of[id(fixed)] == pytest.approx(1e-2)
    args.optimizer = {"type": "SGD", "params": {}}
    with pytest.raises(ValueError, match="use_mup: muP learning rates are implemented for"):
        build_optimizer(args, model)


def test_mup_errors() -> None:
    with pytest.raises(ValueError, match="use_mup needs mup_base_width"):
        GPTModel(ModelConfig.from_neox(mup_args(64, mup_base_width=None)))
    with pytest.raises(
        ValueError, match="init_method: 'xavier_normal' cannot be used with use_mup"
    ):
        GPTModel(ModelConfig.from_neox(mup_args(64, init_method="xavier_normal")))
    config = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "seq_length": 16,
        "max_position_embeddings": 16,
        "tokenizer_type": "bytes",
        "num_gpus": 1,
        "train_micro_batch_size_per_gpu": 1,
        "use_mup": True,
    }
    with pytest.raises(ConfigError, match="use_mup=True .*needs mup_base_width"):
        NeoXArgs.from_dict(config, check_files=False)
    bad = {
        **config,
        "mup_base_width": 32,
        "init_method": "orthogonal",
        "optimizer": {"type": "SGD"},
    }
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_dict(bad, check_files=False)
    assert "init_method='orthogonal' (from dict) cannot be used with use_mup" in str(excinfo.value)
    assert "not optimizer.type 'sgd'" in str(excinfo.value)
    with pytest.raises(ConfigError, match="intermediate_size .* or expansion_factor .* not both"):
        NeoXArgs.from_dict(
            {**config, "use_mup": False, "intermediate_size": 96, "expansion_factor": 2.0},
            check_files=False,
        )


COORD_ARGS = ["--widths", "32,64,128,256", "--steps", "3", "--seeds", "1"]


def test_coord_check_passes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cc"
    assert mup_coord_check.main([*COORD_ARGS, "--output-dir", str(out)]) == 0
    assert "PASS: muP activations are flat in width" in capsys.readouterr().out
    report = json.loads((out / "coord_check.json").read_text())
    assert report["passed"] and report["widths"] == [32, 64, 128, 256]
    assert report["mup_max_abs_slope"] <= 0.25
    assert report["sp_max_slope"] >= 0.5
    assert set(report["slopes"]["mup"]) >= {"embedding", "layers.1.mlp", "logits"}
    assert (out / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coord_check_catches_missing_mup_learning_rates(monkeypatch) -> None:
    monkeypatch.setattr(megatron.optimizers, "mup_hidden_lr_mult", lambda args: 1.0)
    report = mup_coord_check.run(mup_coord_check.parse_args([*COORD_ARGS, "--output-dir", "x"]))
    assert not report["passed"] and report["mup_max_abs_slope"] > 0.25


def test_coord_check_bad_arguments(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mup_coord_check.main(["--widths", "64", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "at least two positive widths" in capsys.readouterr().err


# --------------------------------------------------------------------------- configs

# file -> (unpadded vocabulary, published parameter count)
KNOWN_SIZES = {
    "pythia/14M.yml": (50277, 14_067_712),
    "pythia/31M.yml": (50277, 30_494_720),
    "pythia/70M.yml": (50277, 70_426_624),
    "pythia/160M.yml": (50277, 162_322_944),
    "pythia/410M.yml": (50277, 405_334_016),
    "pythia/1B.yml": (50277, 1_011_781_632),
    "pythia/1.4B.yml": (50277, 1_414_647_808),
    "pythia/2.8B.yml": (50277, 2_775_208_960),
    "pythia/6.9B.yml": (50277, 6_857_302_016),
    "pythia/12B.yml": (50277, 11_846_072_320),
    "llama/llama2-7B.yml": (32000, 6_738_415_616),
    "llama/llama3-8B.yml": (128256, 8_030_261_248),
    "llama/llama3.1-8B.yml": (128256, 8_030_261_248),
    "mistral/7B.yml": (32000, 7_241_732_096),
    "smollm2-135m.yml": (49152, 134_515_008),
}
ARCHITECTURE_DIRS = ("pythia", "llama", "mistral")


def test_every_architecture_config_has_a_known_size() -> None:
    shipped = {
        str(p.relative_to(REPO / "configs"))
        for folder in ARCHITECTURE_DIRS
        for p in (REPO / "configs" / folder).glob("*.yml")
    }
    assert shipped | {"smollm2-135m.yml"} == set(KNOWN_SIZES)


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_architecture_config_loads_with_its_known_size(name: str) -> None:
    stubs = ["num_gpus=1", "data_path=data/stub_text_document", "vocab_file=stub/tokenizer.model"]
    args = NeoXArgs.from_ymls([REPO / "configs" / name], stubs, check_files=False)
    vocab, published = KNOWN_SIZES[name]
    args.padded_vocab_size = pad_vocab_size(vocab, args.make_vocab_size_divisible_by, 1)
    total = parameter_counts(args)["total"]
    # Pythia 6.9B / 12B were padded for tensor parallelism 2 / 4 (a few more vocabulary rows).
    assert total == pytest.approx(published, rel=0.01)
    assert args.train_batch_size == args.train_micro_batch_size_per_gpu * (
        args.gradient_accumulation_steps
    )


def test_llama_family_configs_have_the_published_shapes() -> None:
    def load(name: str) -> NeoXArgs:
        return NeoXArgs.from_ymls([REPO / "configs" / name], ["num_gpus=1"], check_files=False)

    llama3, mistral, smol = (
        load("llama/llama3-8B.yml"),
        load("mistral/7B.yml"),
        load("smollm2-135m.yml"),
    )
    assert (llama3.num_kv_heads, llama3.rotary_emb_base, llama3.ffn_hidden_size) == (
        8,
        500000,
        14336,
    )
    assert (mistral.num_kv_heads, mistral.sliding_window_width) == (8, 4096)
    assert load("llama/llama2-7B.yml").ffn_hidden_size == 11008
    assert load("llama/llama3.1-8B.yml").rope_scaling["rope_type"] == "llama3"
    assert (smol.num_layers, smol.hidden_size, smol.num_attention_heads, smol.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (smol.ffn_hidden_size, smol.no_weight_tying, smol.norm) == (1536, False, "rmsnorm")
    assert (smol.rms_norm_epsilon, smol.rotary_emb_base, smol.seq_length) == (1e-5, 100000, 2048)
