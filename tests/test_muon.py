"""Muon, NOLAH-Muon, Lion and Adafactor: the orthogonalisations, each NOLAH option on small
matrices, the config's checks, and through the real launcher the single-process losses at
(tp, pp, dp) = (2,1,1), (1,2,1), (1,1,2), (2,2,2) and a resume after resharding.

The layout runs use a gated MLP and grouped-query attention, so the per-logical-matrix split
(q, k, v, gate, up) is what makes them exact. Each optimizer's reference run is shared by the
module, and each layout launches once, saving at step 6 where a resume test reads it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config
from _model_fixtures import fixed_tokens, make_args
from test_checkpoint_reshard import checkpoint_at
from test_parallel_equivalence import Layout, rel_diffs, train

from megatron.checkpoint.optimizer_state import OptimizerView
from megatron.model import GPTModel, ModelConfig
from megatron.mpu import vocab_parallel_cross_entropy
from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.optimizers import build_optimizer
from megatron.optimizers.muon import Muon, balanced_owners
from megatron.optimizers.nolah import Nolah
from megatron.optimizers.orthogonalize import newton_schulz, svd_orthogonalize

pytestmark = pytest.mark.timeout(1200)

STEPS, SAVED_AT, REL_TOL = 12, 6, 1e-4
MODEL = {"activation": "swiglu", "num_kv_heads": 2, "intermediate_size": 128}
OPTIMIZERS = {
    "muon": {"type": "Muon", "params": {"lr": 0.02, "ns_dtype": "fp32", "adamw_lr": 3e-3}},
    "muon_nolah": {"type": "muon_nolah", "params": {"lr": 0.02, "ns_dtype": "fp32"}},
}
LAYOUTS = [Layout(tp=2), Layout(pp=2), Layout(dp=2), Layout(tp=2, pp=2, dp=2)]


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double()).float()


# ------------------------------------------------------------------ the orthogonalisations


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_svd_gives_unit_singular_values(shape) -> None:
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(singular_values(svd_orthogonalize(matrix)), torch.ones(min(shape)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 256)])
def test_newton_schulz_lands_in_the_quintics_band(shape, dtype) -> None:
    # The tuned quintic leaves singular values in about [0.68, 1.13] (bf16 rounding widens it a
    # little); a square Gaussian matrix is left out: its smallest singular values are ~0.
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    values = singular_values(newton_schulz(matrix, dtype))
    assert 0.65 < values.min() and values.max() < 1.25, values


# ------------------------------------------------------------------ one matrix, one step


def one_step(grad: torch.Tensor, steps: int = 1, **options) -> tuple[torch.Tensor, Muon]:
    """The update (w_after - w_before) of a Muon step (lr 1, no decay, momentum 0 unless set,
    exact SVD) on a matrix whose gradient is ``grad``, ``steps`` times."""
    weight = torch.nn.Parameter(torch.zeros_like(grad))
    settings = {"momentum": 0.0, "nesterov": False, "orthogonalize": "svd", **options}
    optimizer = Muon([{"params": [weight], "use_muon": True}], lr=1.0, **settings)
    for _ in range(steps):
        before = weight.detach().clone()
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach() - before, optimizer


def training_args(weight_decay: float, lr: float, optimizer: dict, **model):
    """make_args plus the keys build_optimizer reads."""
    args = make_args(**model)
    args.weight_decay, args.lr, args.optimizer = weight_decay, lr, optimizer
    return args


GRAD = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def test_update_scales() -> None:
    update, _ = one_step(GRAD, update_scale="rms")
    assert rms(update) == pytest.approx(0.2, rel=1e-5)  # Moonlight: AdamW's typical RMS
    update, _ = one_step(GRAD.T.contiguous(), update_scale="shape")  # 40 x 24: sqrt(40 / 24)
    torch.testing.assert_close(-update, math.sqrt(40 / 24) * svd_orthogonalize(GRAD.T))
    update, _ = one_step(GRAD, update_scale="shape")  # wide: scale 1
    torch.testing.assert_close(-update, svd_orthogonalize(GRAD))


@pytest.mark.parametrize(
    "gate, expected",
    [
        ("tanh", torch.tanh(GRAD) * GRAD.abs()),
        ("sigmoid", torch.sigmoid(GRAD) * GRAD),
        ("relu", GRAD.clamp(min=0)),
        ("none", GRAD),
    ],
)
def test_gates_change_the_direction(gate, expected) -> None:
    update, _ = one_step(GRAD, nolah=Nolah(gate=gate), update_scale="shape")
    torch.testing.assert_close(-update, svd_orthogonalize(expected))


def test_projection_silu_is_applied_before_orthogonalising() -> None:
    update, _ = one_step(GRAD, nolah=Nolah(projection="silu"), update_scale="shape")
    torch.testing.assert_close(-update, svd_orthogonalize(GRAD * torch.sigmoid(GRAD)))
    assert not torch.allclose(-update, svd_orthogonalize(GRAD))


def test_momentum_scale_applies_above_the_percentile() -> None:
    nolah = Nolah(momentum_scale=0.5, scale_percentile=90)
    _, optimizer = one_step(GRAD, steps=2, momentum=0.9, nolah=nolah)
    (state,) = optimizer.state.values()
    above = GRAD.abs() > GRAD.abs().flatten().kthvalue(math.ceil(0.9 * GRAD.numel())).values
    assert 0.05 < above.float().mean() < 0.15
    expected = torch.where(above, 0.5, 0.9) * GRAD + GRAD
    torch.testing.assert_close(state["momentum_buffer"], expected)


def test_nesterov_momentum() -> None:
    _, optimizer = one_step(GRAD, steps=2, momentum=0.9)
    (state,) = optimizer.state.values()
    torch.testing.assert_close(state["momentum_buffer"], 1.9 * GRAD)


@pytest.mark.parametrize("failure", ["nan", "svd error"])
def test_failures_fall_back_to_the_momentum_and_are_counted(failure) -> None:
    def broken(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if failure == "nan":
            return matrix * float("nan")
        raise torch.linalg.LinAlgError("did not converge")

    weight = torch.nn.Parameter(torch.zeros_like(GRAD))
    optimizer = Muon([{"params": [weight], "use_muon": True}], lr=1.0, update_scale="shape")
    optimizer.orthogonalize = broken
    weight.grad = GRAD.clone()
    optimizer.step()
    assert optimizer.metrics()["orthogonalize_failures"].item() == 1
    # The normalised momentum (Nesterov: 1.95 g), as large as an orthogonal update.
    torch.testing.assert_close(-weight.detach(), GRAD * math.sqrt(24) / GRAD.norm())


def test_fused_weights_are_orthogonalised_per_logical_matrix() -> None:
    params = {"orthogonalize": "svd", "update_scale": "shape"}
    args = training_args(0.0, 0.01, {"type": "muon", "params": params}, **MODEL)
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = build_optimizer(args, model)
    layer = model.layers[0]
    fused = {
        "qkv": layer.attention.query_key_value.weight,
        "gate_up": layer.mlp.dense_h_to_4h.weight,
    }
    before = {name: w.detach().clone() for name, w in fused.items()}
    tokens = fixed_tokens(args, batch=4)
    vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean().backward()
    optimizer.step()
    for name, weight in fused.items():
        update = (before[name] - weight.detach()) / 0.01
        for rows in weight.logical_rows:
            block = update[rows]
            scale = math.sqrt(max(1.0, block.shape[0] / block.shape[1]))
            values = singular_values(block / scale)
            torch.testing.assert_close(values, torch.ones_like(values), msg=name)
        assert not torch.allclose(singular_values(update), torch.ones(1))
    assert len(fused["qkv"].logical_rows) == 3 and len(fused["gate_up"].logical_rows) == 2


def test_embeddings_norms_and_biases_go_to_adamw() -> None:
    params = {"adamw_lr": 0.004, "adamw_wd": 0.5}
    args = training_args(0.1, 0.02, {"type": "muon", "params": params})
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = build_optimizer(args, model)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    layer = model.layers[0]
    for matrix in (layer.attention.query_key_value.weight, layer.mlp.dense_4h_to_h.weight):
        assert group_of[id(matrix)]["use_muon"] and group_of[id(matrix)]["weight_decay"] == 0.1
    embedding = group_of[id(model.embedding.word_embeddings.weight)]
    assert not embedding["use_muon"] and embedding["weight_decay"] == 0.5
    assert embedding["lr"] == pytest.approx(0.004) and embedding["lr_mult"] == pytest.approx(0.2)
    norm = group_of[id(layer.input_layernorm.weight)]
    assert not norm["use_muon"] and norm["weight_decay"] == 0.0


def test_orthogonalisation_work_is_balanced() -> None:
    assert balanced_owners([10, 10, 40, 20, 20], 2) == [0, 1, 0, 1, 1]
    assert balanced_owners([5, 5], 1) == [0, 0]


# ------------------------------------------------------------------ config


def config_error(**overrides) -> str:
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_dict(small_config("data", **overrides), check_files=False)
    return str(excinfo.value)


def test_optimizer_names_are_case_insensitive_with_a_suggestion() -> None:
    for kind in ("MUON", "Muon_NOLAH", "Lion", "adafactor"):
        values = small_config("data", optimizer={"type": kind, "params": {}})
        args = NeoXArgs.from_dict(values, check_files=False)
        assert args.optimizer_type == kind
    message = config_error(optimizer={"type": "muonn", "params": {}})
    assert "unknown optimizer 'muonn'" in message and "did you mean 'muon'" in message


def test_muon_config_errors() -> None:
    muon = {"type": "muon", "params": {"gate": "tanh", "adamw_beta": [0.9, 0.9]}}
    message = config_error(optimizer=muon)
    assert "optimizer.params.gate" in message  # a NOLAH key
    assert "did you mean 'adamw_betas'" in message
    message = config_error(optimizer={"type": "muon_nolah", "params": {"projection": "gelu"}})
    assert "optimizer.params.projection" in message and "'silu'" in message
    message = config_error(optimizer={"type": "muon_nolah", "params": {"momentum_scale": 1.5}})
    assert "optimizer.params.momentum_scale" in message and "[0.0, 1.0]" in message
    message = config_error(optimizer={"type": "muon", "params": {}}, zero_optimization={"stage": 1})
    assert "zero_optimization.stage=1" in message and "cut them apart" in message
    message = config_error(optimizer={"type": "muon", "params": {}}, precision="bfloat16")
    assert "needs fp32" in message


# ------------------------------------------------------------------ lion, adafactor


@pytest.mark.parametrize("kind, lr", [("lion", 3e-3), ("adafactor", 3e-2)])
def test_lion_and_adafactor_train(kind, lr) -> None:
    args = training_args(0.01, lr, {"type": kind, "params": {}})
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = build_optimizer(args, model)
    tokens = fixed_tokens(args, batch=4)
    losses = []
    for _ in range(8):
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5, losses
    if kind == "adafactor":  # factored states: the layout-free format refuses them clearly
        with pytest.raises(ValueError, match="not shaped like it"):
            OptimizerView(optimizer, list(model.parameters())).state_keys(
                model.layers[0].mlp.dense_4h_to_h.weight
            )


# ------------------------------------------------------------------ layouts, resume


def run(tmp: Path, data: str, kind: str, layout: Layout, **overrides) -> dict[int, dict]:
    return train(
        tmp, data, layout, **MODEL, optimizer=OPTIMIZERS[kind], train_iters=STEPS, **overrides
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory, text_dataset):
    """launched(kind, layout) -> (train records, checkpoint folder): each run once."""
    cache: dict = {}

    def get(kind: str, layout: Layout) -> tuple[dict[int, dict], Path]:
        if (kind, layout.name) not in cache:
            tmp = tmp_path_factory.mktemp(f"{kind}-{layout.name}")
            records = run(
                tmp, text_dataset, kind, layout, save=str(tmp / "ckpt"), checkpoint_factor=SAVED_AT
            )
            cache[kind, layout.name] = records, tmp / "ckpt"
        return cache[kind, layout.name]

    return get


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_layout_follows_the_single_process_losses(launched, kind, layout) -> None:
    reference, _ = launched(kind, Layout())
    records, _ = launched(kind, layout)
    losses = rel_diffs(records, reference, "lm_loss")
    print(f"\n{kind} {layout.name}: max rel loss diff {max(losses):.2e}")
    assert max(losses) < REL_TOL, losses
    assert reference[STEPS]["lm_loss"] < reference[1]["lm_loss"] - 1.0
    assert all(r["orthogonalize_failures"] == 0 for r in records.values())


@pytest.mark.parametrize(
    "kind, saved_at, resumed_at",
    [("muon", Layout(tp=2), Layout()), ("muon_nolah", Layout(), Layout(tp=2, pp=2, dp=2))],
    ids=["muon-tp2-to-tp1", "nolah-tp1-to-tp2pp2dp2"],
)
def test_resume_after_resharding(tmp_path, text_dataset, launched, kind, saved_at, resumed_at):
    reference, _ = launched(kind, Layout())
    _, ckpt = launched(kind, saved_at)
    load = checkpoint_at(ckpt, SAVED_AT, tmp_path / "load")
    resumed = run(tmp_path, text_dataset, kind, resumed_at, load=str(load))
    assert sorted(resumed) == list(range(SAVED_AT + 1, STEPS + 1))
    later = {i: reference[i] for i in resumed}
    assert max(rel_diffs(resumed, later, "lm_loss")) < REL_TOL
