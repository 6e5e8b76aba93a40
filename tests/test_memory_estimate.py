"""The per-GPU memory estimate (megatron/neox_arguments/memory.py) against real allocations on
CPU: weights, gradients and optimizer state exactly; activations within 15% of the tensors the
autograd graph saves."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from _config_fixtures import small_config
from _memory_fixtures import tensor_parallel_weights

from megatron import mpu
from megatron.config import ConfigError, NeoXArgs
from megatron.model import ModelConfig, build_model
from megatron.neox_arguments.memory import estimate_memory, parse_bytes
from megatron.optimizers import build_optimizer

pytestmark = pytest.mark.timeout(120)

CONFIGS = [
    {},
    {"no_weight_tying": True, "pos_emb": "learned"},
    {"activation": "swiglu", "norm": "rmsnorm", "num_kv_heads": 2},
    {"optimizer": {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}}},
    {"optimizer": {"type": "sgd", "params": {"lr": 0.1}}},
    {"model_type": "lstm", "no_weight_tying": True},
    {
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "seq_length": 64,
        "max_position_embeddings": 64,
    },
]
# The fp16/bf16 master copy and fp32 states live in DeepSpeed's wrapper: activations only here.
ACTIVATION_CONFIGS = [
    *CONFIGS,
    {"precision": "bf16", "num_layers": 4},
    {"model_type": "lstm", "num_layers": 3},
    {"model_type": "lstm", "hidden_dropout": 0.1, "no_weight_tying": True},
]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _train_once(args):
    """The model and optimizer after one step, and the bytes of the tensors saved for the
    backward (parameters left out: they are the weights)."""
    model = build_model(ModelConfig.from_neox(args), parallel_output=True)
    optimizer = build_optimizer(args, model)
    tokens = torch.randint(0, 256, (args.train_micro_batch_size_per_gpu, args.seq_length))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = mpu.vocab_parallel_cross_entropy(model(tokens), tokens).mean()
    loss.backward()
    optimizer.step()
    return model, optimizer, sum(saved.values())


@pytest.mark.parametrize("overrides", CONFIGS)
def test_weights_gradients_and_optimizer_state_are_exact(overrides):
    args = NeoXArgs.from_dict(small_config(**overrides))
    model, optimizer, _ = _train_once(args)
    params = list(model.parameters())
    # Per-element optimizer state (the step counters are one scalar per tensor).
    states = [
        value
        for param in params
        for value in optimizer.state[param].values()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]
    estimate = estimate_memory(args)
    assert estimate.weights == _tensor_bytes(params)
    assert estimate.gradients == _tensor_bytes(p.grad for p in params)
    assert estimate.optimizer == _tensor_bytes(states)


@pytest.mark.parametrize("overrides", ACTIVATION_CONFIGS)
def test_activations_within_15_percent(overrides):
    args = NeoXArgs.from_dict(small_config(**overrides))
    _, _, saved = _train_once(args)
    estimate = estimate_memory(args)
    predicted = estimate.activations + estimate.logits
    assert predicted == pytest.approx(saved, rel=0.15), (predicted, saved)


def test_tensor_parallel_weights_are_exact(tmp_path):
    """Each of two tensor-parallel ranks holds what the estimate says (split matrices and
    vocabulary, whole norms and row-parallel biases)."""
    layout = {"model_parallel_size": 2, "num_gpus": 2}
    cases = [*CONFIGS[:2], {**CONFIGS[2], "mlp_multiple_of": 2}]  # an MLP width TP=2 splits
    configs = [small_config(**layout, **overrides) for overrides in cases]
    out = tmp_path / "weights.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(
        tensor_parallel_weights,
        args=(2, port, str(out), configs),
        nprocs=2,
        start_method="spawn",
    )
    for estimated, held in json.loads(out.read_text()):
        assert estimated == held


def test_layouts_divide_the_terms():
    """ZeRO 1/2/3 partition optimizer state, gradients and weights over data parallel ranks;
    bf16 halves weights and gradients and adds the fp32 master copy to the optimizer state;
    checkpointing keeps less."""
    base = small_config(num_gpus=4, train_micro_batch_size_per_gpu=2)
    plain = estimate_memory(NeoXArgs.from_dict(base))
    for stage in (1, 2, 3):
        zero = estimate_memory(NeoXArgs.from_dict({**base, "zero_optimization": {"stage": stage}}))
        assert zero.optimizer == plain.optimizer / 4
        assert zero.gradients == plain.gradients / (4 if stage >= 2 else 1)
        assert zero.weights == plain.weights / (4 if stage >= 3 else 1)
    bf16 = estimate_memory(NeoXArgs.from_dict({**base, "precision": "bf16"}))
    assert bf16.weights == plain.weights / 2
    assert bf16.optimizer == plain.optimizer * 3 / 2
    checkpointed = estimate_memory(NeoXArgs.from_dict({**base, "checkpoint_activations": True}))
    assert checkpointed.activations < plain.activations
    tensor_parallel = estimate_memory(NeoXArgs.from_dict({**base, "model_parallel_size": 2}))
    assert tensor_parallel.weights < plain.weights


def test_sizes_parse_and_bad_sizes_name_the_key():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512m") == 512 * 2**20
    assert parse_bytes("1e9") == 10**9
    with pytest.raises(ConfigError, match="device_memory"):
        NeoXArgs.from_dict(small_config(device_memory="lots"))
