"""Tensor and sequence parallelism (megatron/mpu): the sequence-parallel mappings against their
single-process meaning, the model-parallel RNG tracker, sequence-parallel model gradients against
TP=1, and the layout errors raised before any training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config, write_config, write_dataset
from _model_fixtures import fixed_tokens, make_args, run_model, run_on_ranks, run_tp_configs
from conftest import run_tool

from megatron.engine.parallelize import parallelize, shard_sequence
from megatron.model import GPTModel, ModelConfig
from megatron.neox_arguments import ConfigError, NeoXArgs

pytestmark = pytest.mark.timeout(300)

TP = 2
SP_MODEL = dict(
    sequence_parallel=True, activation="swiglu", mlp_multiple_of=8, use_qk_layernorm=True
)


def _check_mappings(rank: int) -> dict[str, bool]:
    from megatron import mpu

    torch.manual_seed(0)
    x = torch.randn(2, 8, 3)  # the same full activation on every rank
    weights = [torch.randn(2, 8, 3) for _ in range(TP)]  # one consumer weight per rank
    mine = x.chunk(TP, dim=1)[rank]
    results = {}

    local = x.clone().requires_grad_()
    scattered = mpu.scatter_to_sequence_parallel_region(local)
    (scattered * weights[rank].chunk(TP, dim=1)[rank]).sum().backward()
    results["scatter_forward"] = torch.equal(scattered, mine)
    # Backward gathers: every rank's positions get the weight of the rank that holds them.
    expected = torch.cat([w.chunk(TP, dim=1)[r] for r, w in enumerate(weights)], dim=1)
    results["scatter_backward"] = torch.allclose(local.grad, expected)

    part = mine.clone().requires_grad_()
    gathered = mpu.gather_from_sequence_parallel_region(part)
    (gathered * weights[rank]).sum().backward()
    results["gather_forward"] = torch.equal(gathered, x)
    # Each rank's consumer saw all positions: the gradient of my positions sums over ranks.
    results["gather_backward"] = torch.allclose(part.grad, sum(weights).chunk(TP, dim=1)[rank])

    part = mine.clone().requires_grad_()
    gathered = mpu.gather_from_sequence_parallel_region(part, grad_is_partial=False)
    (gathered * weights[0]).sum().backward()  # a consumer whose gradient is already summed
    results["gather_full_grad"] = torch.allclose(part.grad, weights[0].chunk(TP, dim=1)[rank])

    partial = (x * (rank + 1)).requires_grad_()
    reduced = mpu.reduce_scatter_to_sequence_parallel_region(partial)
    (reduced * weights[rank].chunk(TP, dim=1)[rank]).sum().backward()
    results["reduce_scatter_forward"] = torch.allclose(reduced, mine * sum(range(1, TP + 1)))
    results["reduce_scatter_backward"] = torch.allclose(partial.grad, expected)
    return results


def _check_rng_tracker(rank: int) -> dict[str, object]:
    from megatron import mpu

    mpu.model_parallel_seed(5)
    with mpu.get_rng_tracker().fork():
        sharded = torch.rand(4)
    shared = torch.rand(4)  # the fork did not advance the shared stream
    state = mpu.get_rng_state()
    with mpu.get_rng_tracker().fork():
        after = torch.rand(4)
    mpu.set_rng_state(state)
    with mpu.get_rng_tracker().fork():
        again = torch.rand(4)
    torch.manual_seed(5)
    return {
        "sharded": sharded,
        "shared": shared,
        "shared_is_unforked": torch.equal(shared, torch.rand(4)),
        "restored": torch.equal(after, again),
    }


def _tp_checks(rank: int) -> dict:
    results = {"mappings": _check_mappings(rank), "rng": _check_rng_tracker(rank)}
    (results["model"],) = run_tp_configs(rank, [SP_MODEL])
    return results


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_tp_checks, TP, tmp_path_factory.mktemp("tp") / "results.pt", tp=TP)


def test_sequence_parallel_mappings(tp_results) -> None:
    for rank, results in enumerate(tp_results):
        failed = [name for name, ok in results["mappings"].items() if not ok]
        assert not failed, f"rank {rank}: {failed}"


def test_rng_tracker_streams(tp_results) -> None:
    first, second = (results["rng"] for results in tp_results)
    # Split activations draw different masks per rank; replicated ones draw the same.
    assert not torch.equal(first["sharded"], second["sharded"])
    assert torch.equal(first["shared"], second["shared"])
    for results in (first, second):
        assert results["shared_is_unforked"] and results["restored"]


def test_sequence_parallel_model_matches_single_process(tp_results) -> None:
    args = make_args(**{**SP_MODEL, "sequence_parallel": False})
    single = run_model(GPTModel(ModelConfig.from_neox(args)), args)
    for tp in tp_results:
        torch.testing.assert_close(tp["model"]["logits"], single["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tp["model"]["loss"], single["loss"])
        # Norm weights and row-parallel biases see half the positions per rank: their
        # gradients are complete only after the tensor-parallel reduction.
        for name, grad in single["grads"].items():
            torch.testing.assert_close(
                tp["model"]["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name
            )


def test_sequence_parallel_generation_is_a_clear_error() -> None:
    from megatron.model.kv_cache import KVCache

    args = make_args(**SP_MODEL)
    # One process: sequence parallelism is off, generation works.
    model = parallelize(GPTModel(ModelConfig.from_neox(args)), args.sequence_parallel)
    model(fixed_tokens(args), kv_cache=KVCache())
    shard_sequence(model)
    with pytest.raises(ValueError, match="generate with sequence_parallel false"):
        model(fixed_tokens(args), kv_cache=KVCache())


# ---------------------------------------------------------------------------- bad layouts


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    return write_dataset(tmp_path / "data" / "tiny_text_document", [[1, 2, 3, 4], [5, 6, 7]])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            dict(model_parallel_size=2, num_gpus=3),
            r"global_num_gpus = 3\) must be divisible by model_parallel_size x",
        ),
        (
            dict(model_parallel_size=3, num_gpus=3),
            r"num_attention_heads \(4\) must be divisible by model_parallel_size \(3\)",
        ),
        (
            dict(
                model_parallel_size=4,
                num_gpus=4,
                hidden_size=96,
                num_attention_heads=12,
                num_kv_heads=3,
            ),
            r"num_kv_heads \(3\) and model_parallel_size \(4\) must divide one another",
        ),
        (
            dict(
                model_parallel_size=8,
                num_gpus=8,
                hidden_size=48,
                num_attention_heads=8,
                num_kv_heads=2,
            ),
            r"head_dim \(6\) must be divisible by the 4 ranks sharing each key/value head",
        ),
        (
            dict(model_parallel_size=2, num_gpus=2, intermediate_size=99, mlp_multiple_of=1),
            r"MLP width \(99.*divisible by model_parallel_size \(2\)",
        ),
        (
            dict(model_parallel_size=4, num_gpus=4, seq_length=30, sequence_parallel=True),
            r"seq_length \(30\) must be divisible by model_parallel_size \(4\) with "
            "sequence_parallel",
        ),
        (dict(model_parallel_size=-1), "model_parallel_size must be >= 0"),
    ],
)
def test_bad_layout_is_a_config_error(dataset: str, overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        NeoXArgs.from_dict(small_config(dataset, **overrides))


def test_padded_vocabulary_divides_by_the_tensor_parallel_size(dataset: str) -> None:
    for tp in (1, 2, 4):
        args = NeoXArgs.from_dict(small_config(dataset, model_parallel_size=tp, num_gpus=tp))
        assert args.padded_vocab_size % (128 * tp) == 0


def test_bad_layout_stops_the_launcher_before_training(tmp_path: Path, dataset: str) -> None:
    values = small_config(dataset, model_parallel_size=3, num_gpus=3, log_dir=str(tmp_path))
    result = run_tool("deepy.py", "train.py", write_config(tmp_path / "c.yml", values), check=False)
    assert result.returncode != 0
    assert "num_attention_heads (4) must be divisible by model_parallel_size (3)" in (
        result.stderr + result.stdout
    )
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "shape,dim,stride,order",
    [
        ((24, 6), 0, 1, None),  # column-parallel rows
        ((24, 6), 0, 2, None),  # a gated MLP's [gate; up]
        ((6, 24), 1, 1, None),  # row-parallel columns
        ((24, 6), 0, 1, torch.randperm(24, generator=torch.Generator().manual_seed(0))),
    ],
    ids=["rows", "stride2", "columns", "ordered"],
)
def test_each_rank_initialises_its_own_slice_of_the_same_weight(
    monkeypatch, shape, dim, stride, order
) -> None:
    """Shard-local initialisation: the slices 4 ranks draw alone merge to the weight one process
    draws, and each takes one draw from the layer's generator, so later weights agree too."""
    from megatron.mpu import layers
    from megatron.mpu.random import init_rng

    init = layers.ElementwiseInit(lambda t: torch.nn.init.normal_(t, std=0.02))

    def build(world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(layers, "get_tensor_model_parallel_world_size", lambda: world)
        monkeypatch.setattr(layers, "get_tensor_model_parallel_rank", lambda: rank)
        with init_rng(1234, 3):
            weight = layers.partitioned_parameter(shape, dim, init, torch.float32, stride, order)
            after = torch.rand(3)  # what the next weight of the layer would draw from
        return weight.detach(), after

    one, after = build(1, 0)
    whole = layers.merge_partitions([one], dim, stride, order)  # canonical order
    slices = [build(4, rank) for rank in range(4)]
    merged = layers.merge_partitions([s for s, _ in slices], dim, stride, order)
    assert torch.equal(merged, whole)
    assert all(torch.equal(a, after) for _, a in slices)
    assert whole.std().item() == pytest.approx(0.02, rel=0.3)
