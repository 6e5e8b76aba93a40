"""Helpers for tests/test_model.py: a tiny model config and spawned gloo ranks.

Kept apart from the test module so spawned workers import only torch and megatron.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def make_args(**overrides: Any) -> SimpleNamespace:
    """A tiny GPT config carrying every NeoX key the model reads (ModelConfig.from_neox takes
    it), with the MLP width derived as NeoXArgs derives it."""
    from megatron.neox_arguments.sizes import ffn_sizes

    args = dict(
        model_type="gpt",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=None,
        seq_length=16,
        max_position_embeddings=32,
        padded_vocab_size=128,
        norm="layernorm",
        layernorm_epsilon=1e-5,
        rms_norm_epsilon=1e-8,
        scalenorm_epsilon=1e-8,
        pos_emb="rotary",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        rope_scaling=None,
        sliding_window_width=None,
        use_qk_layernorm=False,
        attention_config=None,
        attention_backend="sdpa",
        te_mha=False,
        no_weight_tying=False,
        gpt_j_residual=False,
        gpt_j_tied=False,
        activation="gelu",
        intermediate_size=None,
        expansion_factor=None,
        mlp_multiple_of=1,
        init_method="normal",
        output_layer_init_method="scaled_normal",
        init_method_std=0.02,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        sequence_parallel=False,
        use_bias_in_norms=True,
        use_bias_in_attn_linear=True,
        use_bias_in_mlp=True,
        params_dtype=torch.float32,
        seed=1234,
        use_mup=False,
        mup_base_width=None,
        mup_init_scale=1.0,
        mup_embedding_mult=1.0,
        mup_output_temp=1.0,
        mup_attn_temp=1.0,
        checkpoint_activations=False,
        checkpoint_num_layers=1,
    )
    unknown = set(overrides) - set(args)
    if unknown:
        raise KeyError(f"make_args: unknown keys {sorted(unknown)}")
    args.update(overrides)
    namespace = SimpleNamespace(**args)
    namespace.ffn_hidden_size = ffn_sizes(namespace)[1]
    return namespace


# The configurations the tensor-parallel test compares against a single process.
TP_CONFIGS: list[dict[str, Any]] = [
    {},
    {"no_weight_tying": True, "gpt_j_residual": True, "pos_emb": "learned"},
    # gated MLP: [gate; up] split with stride 2 (intermediate_size 192 -> 2 x 64 rows)
    {"activation": "swiglu", "norm": "rmsnorm", "intermediate_size": 192},
    # GQA: each rank holds one whole key/value group and its heads' ALiBi slopes
    {"num_kv_heads": 2, "pos_emb": "alibi", "sliding_window_width": 6, "use_qk_layernorm": True},
    # One key/value head shared by every rank: each holds part of its channels (and bias).
    {"num_kv_heads": 1, "use_qk_layernorm": True, "rotary_pct": 1.0},
]
# At TP=4, pairs of ranks share a key/value head (a subgroup of the tensor-parallel group).
SHARED_KV_CONFIGS: list[dict[str, Any]] = [
    {"num_kv_heads": 2, "pos_emb": "alibi"},
    {"num_kv_heads": 1, "use_qk_layernorm": True, "sequence_parallel": True},
]


def fixed_tokens(args: SimpleNamespace, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, args.padded_vocab_size, (batch, args.seq_length + 1), generator=gen)


def run_model(model: torch.nn.Module, args: SimpleNamespace) -> dict[str, Any]:
    """Full logits, loss and full-size gradients of one forward/backward on fixed tokens."""
    from megatron.mpu import (
        gather_from_tensor_model_parallel_region,
        get_tensor_model_parallel_world_size,
        vocab_parallel_cross_entropy,
    )
    from megatron.mpu.layers import merge_partitions

    tokens = fixed_tokens(args)
    logits = model(tokens[:, :-1])
    loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean()
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        dim = getattr(param, "partition_dim", None)
        if dim is not None and dist.is_initialized():
            # Reuse the gather mapping on the partitioned dimension moved last.
            grad = gather_from_tensor_model_parallel_region(grad.movedim(dim, -1)).movedim(-1, dim)
            # Rank-major slices -> canonical order (a gated MLP's [gate; up] has stride 2).
            parts = list(grad.chunk(get_tensor_model_parallel_world_size(), dim))
            order = getattr(param, "partition_order", None)
            grad = merge_partitions(parts, dim, param.partition_stride, order)
        grads[name] = grad.detach().clone()
    full_logits = gather_from_tensor_model_parallel_region(logits.detach())
    return {"logits": full_logits, "loss": loss.detach(), "grads": grads}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_rank(
    rank: int, world_size: int, tp: int, pp: int, port: int, out_path: str, fn, fn_args
) -> None:
    """One spawned rank: gloo and mpu's groups for (tp, pp), then `fn(rank, *fn_args)`;
    every rank's result is gathered and rank 0 saves the list."""
    from megatron.mpu import destroy_model_parallel, initialize_model_parallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        initialize_model_parallel(tensor_parallel_size=tp, pipe_parallel_size=pp)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, fn(rank, *fn_args))
        if rank == 0:
            torch.save(gathered, out_path + ".tmp")
            os.replace(out_path + ".tmp", out_path)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def run_on_ranks(
    fn, world_size: int, out_path: Path, tp: int = 1, pp: int = 1, fn_args: tuple = ()
) -> list:
    """Every rank's `fn(rank, *fn_args)` (a module-level function: ranks are spawned) on a
    gloo group of `world_size` processes with tensor size `tp` and pipeline size `pp`."""
    mp.start_processes(
        _gloo_rank,
        args=(world_size, tp, pp, free_port(), str(out_path), fn, fn_args),
        nprocs=world_size,
        start_method="spawn",
    )
    return torch.load(out_path, weights_only=False)


def run_tp_configs(rank: int, configs: list[dict]) -> list[dict]:
    """`configs` at the tensor-parallel size of the group (run_on_ranks' fn)."""
    from megatron.engine.parallelize import parallelize
    from megatron.model import GPTModel, ModelConfig

    results = []
    for overrides in configs:
        args = make_args(**overrides)
        model = GPTModel(ModelConfig.from_neox(args), parallel_output=True)
        results.append(run_model(parallelize(model, args.sequence_parallel), args))
    return results
