"""Pipeline parallelism (DeepSpeed PipelineModule) and activation checkpointing.

In-process: activation checkpointing recomputes blocks and changes nothing numerically;
pipeline names map back to canonical names. Spawned (gloo): every stage's weights equal the
sequential model's. Through deepy.py: pipeline runs log the single process's losses
(tests/test_checkpoint_reshard.py resumes pipeline checkpoints at other layouts).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from _config_fixtures import small_config, write_config
from _model_fixtures import fixed_tokens
from _model_fixtures import make_args as _make_args
from conftest import run_tool
from test_training import read_metrics

from megatron.engine.pipeline import canonical_name
from megatron.model import GPTModel, ModelConfig
from megatron.mpu.random import model_parallel_seed

pytestmark = pytest.mark.timeout(900)

# Every logged loss of a parallel run is within this of the single-process run's (fp32).
REL_TOLERANCE = 1e-4


def make_args(**overrides):
    args = _make_args(**overrides)
    vars(args).setdefault("sequence_parallel", False)  # read by the tensor-parallel layers
    model_parallel_seed(args.seed)  # the dropout stream of mpu's RNG tracker
    return args


def _loss_and_grads(args, tokens: torch.Tensor) -> tuple[torch.Tensor, dict, list[int]]:
    model = GPTModel(ModelConfig.from_neox(args)).train()
    calls: list[int] = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    torch.manual_seed(0)  # the dropout masks
    logits = model(tokens)
    loss = logits.float().pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("chunk", [1, 2])
def test_activation_checkpointing_recomputes_and_matches(chunk):
    common = dict(num_layers=3, hidden_dropout=0.1, attention_dropout=0.1)
    args = make_args(**common)
    tokens = fixed_tokens(args)
    loss, grads, calls = _loss_and_grads(args, tokens)
    ck_args = make_args(checkpoint_activations=True, checkpoint_num_layers=chunk, **common)
    ck_loss, ck_grads, ck_calls = _loss_and_grads(ck_args, tokens)
    assert calls == [0, 1, 2]
    # Each block runs again in the backward pass (the chunks in reverse order).
    assert sorted(ck_calls) == [0, 0, 1, 1, 2, 2]
    # Recomputation restores the RNG state: the same dropout masks, the same numbers.
    assert torch.equal(ck_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(ck_grads[name], grad), name


def test_canonical_names():
    assert canonical_name("0.word_embeddings.weight", 2) == "embedding.word_embeddings.weight"
    assert canonical_name("tied_modules.embed.word_embeddings.weight", 2) == (
        "embedding.word_embeddings.weight"
    )
    assert canonical_name("1.attention.dense.weight", 2) == "layers.0.attention.dense.weight"
    assert canonical_name("2.mlp.dense_4h_to_h.bias", 2) == "layers.1.mlp.dense_4h_to_h.bias"
    assert canonical_name("3.norm.weight", 2) == "final_norm.norm.weight"
    assert canonical_name("4.weight", 2) == "lm_head.weight"
    for bad in ("embedding.weight", "5.weight"):
        with pytest.raises(ValueError, match="pipeline|past the head"):
            canonical_name(bad, 2)


# -- stages built in spawned processes -----------------------------------------------------------


def _stage_worker(rank: int, world: int, port: int, overrides: dict, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    import deepspeed

    from megatron import mpu
    from megatron.engine.pipeline import build_pipeline_model

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        mpu.initialize_model_parallel(1, world)
        args = make_args(**overrides)
        args.pipe_partition_method = "type:transformer|mlp"
        model = build_pipeline_model(args)
        state = dict(model.canonical_named_parameters(replicas=False))
        queue.put((rank, {name: tensor.detach().clone() for name, tensor in state.items()}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "overrides",
    [{"num_layers": 3}, {"num_layers": 2, "no_weight_tying": True, "pos_emb": "learned"}],
)
def test_pipeline_stages_hold_the_sequential_weights(overrides):
    from megatron.utils import free_port

    world, port = 2, free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_stage_worker, args=(r, world, port, overrides, queue))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    stages = dict(queue.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    reference = dict(GPTModel(ModelConfig.from_neox(make_args(**overrides))).named_parameters())
    # Each stage holds a disjoint part; together they are the whole sequential model.
    assert not stages[0].keys() & stages[1].keys()
    assert stages[0].keys() | stages[1].keys() == reference.keys()
    assert any(name.startswith("layers.") for name in stages[1])
    for stage in stages.values():
        for name, tensor in stage.items():
            assert torch.equal(tensor, reference[name]), name


# -- training through the launcher ---------------------------------------------------------------


def _train(tmp_path, data: str, name: str, **overrides) -> dict:
    run = tmp_path / name
    values = small_config(
        data,
        train_iters=8,
        eval_interval=4,
        eval_iters=1,
        log_interval=1,
        split="90,10,0",
        seed=5,
        warmup=0.1,
        gradient_clipping=1.0,
        train_micro_batch_size_per_gpu=2,
        log_dir=str(run / "logs"),
        **overrides,
    )
    run_tool("deepy.py", "train.py", write_config(run / "config.yml", values))
    return {key: r["lm_loss"] for key, r in read_metrics(run / "logs").items()}


def _assert_close(reference: dict, other: dict) -> float:
    assert other.keys() == reference.keys()
    worst = 0.0
    for key, loss in reference.items():
        worst = max(worst, abs(other[key] - loss) / abs(loss))
        assert other[key] == pytest.approx(loss, rel=REL_TOLERANCE), key
    return worst


def test_untied_pipeline_matches_single_process(tmp_path, text_dataset):
    """Untied head, learned positions, uniform partitioning and checkpointed stages over two
    data-parallel pipelines (tests/test_parallel_equivalence.py has the tied model's layouts)."""
    common = dict(num_layers=4, no_weight_tying=True, pos_emb="learned")
    one = _train(tmp_path, text_dataset, "one", gradient_accumulation_steps=4, **common)
    parallel = _train(
        tmp_path,
        text_dataset,
        "parallel",
        pipe_parallel_size=2,
        num_gpus=4,
        gradient_accumulation_steps=2,
        pipe_partition_method="uniform",
        checkpoint_activations=True,
        checkpoint_num_layers=2,
        **common,
    )
    worst = _assert_close(one, parallel)
    print(f"\nuntied pp2 dp2 with checkpointing: worst relative loss difference {worst:.2e}")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_layers": 2, "pipe_parallel_size": 4, "num_gpus": 4}, "num_layers \\(2\\) must"),
        (
            {"pipe_parallel_size": 2, "num_gpus": 2, "reset_position_ids": True},
            "reset_position_ids=True",
        ),
        ({"pipe_parallel_size": 2, "num_gpus": 2, "pipe_partition_method": "x"}, "expected"),
        (
            {"pipe_parallel_size": 2, "num_gpus": 2, "zero_optimization": {"stage": 2}},
            "zero_optimization.stage=2",
        ),
    ],
)
def test_unsupported_pipeline_configs_are_errors(tmp_path, text_dataset, overrides, message):
    import re

    values = small_config(text_dataset, **overrides)
    result = run_tool("deepy.py", "train.py", write_config(tmp_path / "c.yml", values), check=False)
    assert result.returncode != 0
    assert re.search(message, result.stderr + result.stdout), result.stderr[-2000:]
