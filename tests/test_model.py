"""The transformer (megatron/model) and its tensor-parallel building blocks (megatron/mpu)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _model_fixtures import (
    SHARED_KV_CONFIGS,
    TP_CONFIGS,
    fixed_tokens,
    make_args,
    run_model,
    run_on_ranks,
    run_tp_configs,
)

from megatron.model import GPTModel, ModelConfig, count_parameters
from megatron.mpu import (
    get_rng_state,
    model_parallel_is_initialized,
    parallel_grid,
    set_rng_state,
    vocab_parallel_cross_entropy,
)

HF_VOCAB = 100


def _hf_neox(use_parallel_residual: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=32,
        layer_norm_eps=1e-5,
        use_parallel_residual=use_parallel_residual,
        tie_word_embeddings=False,
        attention_bias=True,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # HF starts norms at 1/0 and biases at 0: perturb so all are tested
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _strata_name(hf_name: str) -> str:
    name = hf_name.removeprefix("gpt_neox.")
    for old, new in (
        ("embed_in.", "embedding.word_embeddings."),
        ("final_layer_norm.", "final_norm.norm."),
        ("embed_out.", "lm_head."),
    ):
        name = name.replace(old, new)
    return name


@pytest.mark.parametrize("parallel_residual", [True, False])
def test_logits_match_hugging_face_gpt_neox(parallel_residual: bool) -> None:
    hf = _hf_neox(parallel_residual)
    args = make_args(no_weight_tying=True, gpt_j_residual=parallel_residual)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for hf_name, hf_param in hf.named_parameters():
            target = ours.pop(_strata_name(hf_name))
            # Vocabulary rows beyond HF's vocab are padding; they keep their own init.
            target[: hf_param.size(0)].copy_(hf_param)
    assert not ours, f"parameters without a Hugging Face counterpart: {sorted(ours)}"

    tokens = fixed_tokens(make_args(padded_vocab_size=HF_VOCAB), batch=3)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)[..., :HF_VOCAB]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tied_head_shares_embedding_storage() -> None:
    tied = GPTModel(ModelConfig.from_neox(make_args()))
    assert tied.lm_head.output_weight() is tied.embedding.word_embeddings.weight
    assert "lm_head.weight" not in tied.state_dict()

    untied = GPTModel(ModelConfig.from_neox(make_args(no_weight_tying=True)))
    head, embedding = untied.lm_head.output_weight(), untied.embedding.word_embeddings.weight
    assert head.data_ptr() != embedding.data_ptr()
    assert not torch.equal(head, embedding)
    assert "lm_head.weight" in untied.state_dict()


def test_learned_positions_run_and_differ_from_rotary() -> None:
    tokens = fixed_tokens(make_args())
    rotary = GPTModel(ModelConfig.from_neox(make_args()))
    learned = GPTModel(ModelConfig.from_neox(make_args(pos_emb="learned")))
    assert "embedding.position_embeddings.weight" in learned.state_dict()
    assert not any("position_embeddings" in k for k in rotary.state_dict())
    with torch.no_grad():
        out_learned, out_rotary = learned(tokens), rotary(tokens)
    assert torch.isfinite(out_learned).all()
    assert not torch.allclose(out_learned, out_rotary)
    # Positions matter: the same token at two places gives two different outputs.
    same = torch.full((1, 8), 5)
    with torch.no_grad():
        out = learned(same)
    assert not torch.allclose(out[0, 3], out[0, 6])


INIT_STD = {  # NeoX's formulas, for hidden size h and n layers
    "normal": lambda h, n: 0.02,
    "scaled_normal": lambda h, n: 0.02 / math.sqrt(2 * n),
    "small_init": lambda h, n: math.sqrt(2 / (5 * h)),
    "wang_init": lambda h, n: 2 / n / math.sqrt(h),
}


@pytest.mark.parametrize("method", sorted(INIT_STD))
def test_init_method_std(method: str) -> None:
    h, n = 256, 4
    args = make_args(
        hidden_size=h, num_layers=n, init_method=method, output_layer_init_method=method
    )
    model = GPTModel(ModelConfig.from_neox(args))
    want = INIT_STD[method](h, n)
    layer = model.layers[1]
    # init_method: input-side weights and embeddings; output_layer_init_method: the projections
    # back into the residual stream. Both are set to `method` here.
    for weight in (
        layer.attention.query_key_value.weight,
        layer.mlp.dense_h_to_4h.weight,
        layer.attention.dense.weight,
        layer.mlp.dense_4h_to_h.weight,
        model.embedding.word_embeddings.weight,
    ):
        assert weight.std().item() == pytest.approx(want, rel=0.03)
        assert abs(weight.mean().item()) < want * 0.05
    assert torch.count_nonzero(layer.attention.query_key_value.bias) == 0
    assert torch.count_nonzero(layer.mlp.dense_4h_to_h.bias) == 0


def test_output_layer_init_method_applies_to_output_projections_only() -> None:
    h, n = 256, 8
    model = GPTModel(
        ModelConfig.from_neox(
            make_args(hidden_size=h, num_layers=n, output_layer_init_method="wang_init")
        )
    )
    layer = model.layers[0]
    assert layer.attention.dense.weight.std().item() == pytest.approx(2 / n / h**0.5, rel=0.03)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(2 / n / h**0.5, rel=0.03)
    assert layer.attention.query_key_value.weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_weights_do_not_depend_on_the_other_layers() -> None:
    # Pipeline stages build only some layers: each layer draws from its own RNG stream.
    two = GPTModel(ModelConfig.from_neox(make_args(num_layers=2)))
    torch.rand(100)  # global RNG traffic between the builds must not matter either
    three = GPTModel(ModelConfig.from_neox(make_args(num_layers=3)))
    assert torch.equal(two.embedding.word_embeddings.weight, three.embedding.word_embeddings.weight)
    for i in range(2):
        assert torch.equal(
            two.layers[i].attention.query_key_value.weight,
            three.layers[i].attention.query_key_value.weight,
        )
    assert not torch.equal(
        two.layers[0].attention.query_key_value.weight,
        two.layers[1].attention.query_key_value.weight,
    )


def test_model_is_causal() -> None:
    model = GPTModel(ModelConfig.from_neox(make_args(pos_emb="learned"))).eval()
    tokens = fixed_tokens(make_args())
    changed = tokens.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % 128
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], atol=0, rtol=0)
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_explicit_causal_mask_matches_default() -> None:
    model = GPTModel(ModelConfig.from_neox(make_args())).eval()
    tokens = fixed_tokens(make_args())
    s = tokens.size(1)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, attention_mask=mask), model(tokens))
    with pytest.raises(ValueError, match="boolean"):
        model(tokens, attention_mask=mask.float())


def test_explicit_position_ids_match_default() -> None:
    for pos_emb in ("rotary", "learned"):
        model = GPTModel(ModelConfig.from_neox(make_args(pos_emb=pos_emb))).eval()
        tokens = fixed_tokens(make_args())
        positions = torch.arange(tokens.size(1)).expand_as(tokens)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens, position_ids=positions), model(tokens))


def test_training_steps_reduce_loss() -> None:
    args = make_args()
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = fixed_tokens(args, batch=4)
    losses = []
    for _ in range(30):
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(args.padded_vocab_size), rel=0.05)
    assert losses[-1] < losses[0] - 1.0


def test_dropout_only_in_training() -> None:
    model = GPTModel(ModelConfig.from_neox(make_args(hidden_dropout=0.3, attention_dropout=0.3)))
    tokens = fixed_tokens(make_args())
    with torch.no_grad():
        model.train()
        a, b = model(tokens), model(tokens)
        model.eval()
        c, d = model(tokens), model(tokens)
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


def test_bf16_forward_keeps_param_dtype() -> None:
    model = GPTModel(ModelConfig.from_neox(make_args(params_dtype=torch.bfloat16)))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(fixed_tokens(make_args()))
    assert logits.dtype == torch.bfloat16
    assert logits.shape == (2, 17, 128)


def test_vocab_parallel_cross_entropy_matches_torch() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 128, generator=gen) * 3).requires_grad_()
    # Labels include ids in the padded tail of the vocabulary.
    labels = torch.tensor([[0, 127, 101, 64, 5], [99, 100, 1, 126, 3]])
    ours = vocab_parallel_cross_entropy(logits, labels)
    reference = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(ours, reference)
    weights = torch.rand(2, 5, generator=gen)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_vocab_parallel_cross_entropy_bf16_and_shape_check() -> None:
    logits = torch.randn(2, 3, 16).bfloat16().requires_grad_()
    labels = torch.randint(0, 16, (2, 3))
    loss = vocab_parallel_cross_entropy(logits, labels)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_cross_entropy(logits, labels[:, :2])


def test_compiled_cross_entropy_kernels_match_eager(monkeypatch) -> None:
    """torch_compile's fused cross-entropy kernels: the same loss and logits gradient."""
    from megatron.mpu import cross_entropy

    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 7, 96, generator=gen) * 4).bfloat16().requires_grad_()
    labels = torch.randint(0, 96, (2, 7), generator=gen)
    weights = torch.rand(2, 7, generator=gen)
    results = []
    for compiled in (False, True):
        if compiled:  # on a copy of the kernel table, so later tests run eager again
            monkeypatch.setattr(cross_entropy, "_kernels", copy.copy(cross_entropy._kernels))
            cross_entropy.compile_cross_entropy_kernels()
            assert cross_entropy._kernels.logits_grad is not cross_entropy._logits_grad
        loss = vocab_parallel_cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
        results.append((loss, grad))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)
    reference = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(compiled_loss, reference)


def test_the_model_builds_from_model_config_alone() -> None:
    """No NeoX or training config: the sizes and the choices that differ from the defaults."""
    config = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        padded_vocab_size=128,
        max_position_embeddings=32,
        pos_emb="rotary",
        rotary_pct=0.25,
    )
    assert config == ModelConfig.from_neox(make_args())
    assert config.ffn_hidden_size == 256 and config.attention_backends == ("sdpa", "sdpa")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 128
    alone, from_neox = GPTModel(config), GPTModel(ModelConfig.from_neox(make_args()))
    for (name, a), (_, b) in zip(alone.state_dict().items(), from_neox.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_model_runs_with_no_process_group() -> None:
    """The model reads no parallel state: no torch.distributed, no mpu grid, forward and
    backward from a ModelConfig alone (tensor parallelism is applied by the engine's plan)."""
    assert not torch.distributed.is_initialized() and not model_parallel_is_initialized()
    config = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        padded_vocab_size=128,
        max_position_embeddings=32,
        num_kv_heads=2,
        use_qk_layernorm=True,
        activation="swiglu",
        pos_emb="alibi",
    )
    model = GPTModel(config)
    logits = model(torch.randint(0, 128, (2, 8)))
    assert logits.shape == (2, 8, 128) and torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rng_state_round_trip() -> None:
    def draw():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()

    state = pickle.loads(pickle.dumps(get_rng_state()))
    first = draw()
    set_rng_state(state)
    assert draw() == first
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state({"python": state["python"], "torch": state["torch"]})


def expected_parameter_count(args) -> int:
    """The hand formula (the config package's derived parameter count must agree)."""
    h, v, n = args.hidden_size, args.padded_vocab_size, args.num_layers
    f = args.intermediate_size or 4 * h
    norm = h * (2 if args.use_bias_in_norms else 1)
    norms_per_layer = 1 if (args.gpt_j_residual and args.gpt_j_tied) else 2
    attn = 4 * h * h + (4 * h if args.use_bias_in_attn_linear else 0)
    mlp = 2 * h * f + ((f + h) if args.use_bias_in_mlp else 0)
    total = v * h + n * (norms_per_layer * norm + attn + mlp) + norm
    if args.pos_emb == "learned":
        total += args.max_position_embeddings * h
    if args.no_weight_tying:
        total += v * h
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"no_weight_tying": True, "pos_emb": "learned"},
        {"gpt_j_residual": True, "gpt_j_tied": True, "intermediate_size": 96},
        {"use_bias_in_norms": False, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False},
    ],
)
def test_parameter_count_matches_formula(overrides) -> None:
    args = make_args(**overrides)
    assert count_parameters(GPTModel(ModelConfig.from_neox(args))) == expected_parameter_count(args)


def test_bad_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        GPTModel(ModelConfig.from_neox(make_args(num_kv_heads=3)))
    with pytest.raises(ValueError, match="init_method"):
        GPTModel(ModelConfig.from_neox(make_args(init_method="nope")))
    with pytest.raises(ValueError, match="activation"):
        GPTModel(ModelConfig.from_neox(make_args(activation="nope")))
    with pytest.raises(ValueError, match="pos_emb: 'rpe'.*not supported"):
        GPTModel(ModelConfig.from_neox(make_args(pos_emb="rpe")))
    with pytest.raises(ValueError, match="rotary_pct"):
        GPTModel(ModelConfig.from_neox(make_args(rotary_pct=0.1)))  # 1.6 channels per 16-wide head


def test_parallel_grid_matches_deepspeed_topology() -> None:
    topology = pytest.importorskip("deepspeed.runtime.pipe.topology")
    for tp, pp, dp in [(2, 2, 2), (4, 1, 2), (1, 3, 2), (2, 1, 1)]:
        grid = parallel_grid(tp * pp * dp, tp, pp)
        ds = topology.PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        for axis in ("model", "data", "pipe"):
            assert sorted(grid[axis]) == sorted(ds.get_axis_comm_lists(axis)), axis
    with pytest.raises(ValueError, match="divisible"):
        parallel_grid(6, 4, 1)


@pytest.mark.parametrize(("tp", "configs"), [(2, TP_CONFIGS), (4, SHARED_KV_CONFIGS)])
def test_tensor_parallel_matches_single_process(tmp_path, tp, configs) -> None:
    (results, *_) = run_on_ranks(
        run_tp_configs, tp, tmp_path / f"tp{tp}.pt", tp=tp, fn_args=(configs,)
    )
    for overrides, result in zip(configs, results, strict=True):
        args = make_args(**overrides)
        single = run_model(GPTModel(ModelConfig.from_neox(args)), args)
        torch.testing.assert_close(result["logits"], single["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["loss"], single["loss"])
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"activation": "swiglu", "norm": "rmsnorm", "num_kv_heads": 2}],
    ids=["neox", "llama"],
)
def test_compiled_blocks_match_eager(overrides) -> None:
    """torch_compile: the compiled blocks compute the same loss and gradients, under the same
    parameter names."""
    from megatron.model.compile import compile_transformer_blocks

    args = make_args(**overrides)
    eager = GPTModel(ModelConfig.from_neox(args))
    compiled = copy.deepcopy(eager)
    assert compile_transformer_blocks(compiled) == args.num_layers
    assert list(compiled.state_dict()) == list(eager.state_dict())
    tokens = fixed_tokens(args)
    results = []
    for model in (eager, compiled):
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
