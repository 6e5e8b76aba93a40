"""Spawned ranks for tests/test_memory_estimate.py: the weights a tensor-parallel rank holds.

Kept apart from the test module so spawned workers import only torch and megatron.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def tensor_parallel_weights(
    rank: int, world_size: int, port: int, out_path: str, configs: list[dict]
) -> None:
    """Rank 0 writes, for each config, the estimate's weight bytes and the bytes of this rank's
    parameters at TP = world_size."""
    import megatron.config  # noqa: F401  (every config rule registered)
    from megatron.config import NeoXArgs
    from megatron.model import ModelConfig, build_model
    from megatron.mpu import destroy_model_parallel, initialize_model_parallel
    from megatron.neox_arguments.memory import estimate_memory

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        initialize_model_parallel(tensor_parallel_size=world_size)
        results = []
        for values in configs:
            args = NeoXArgs.from_dict(values)
            model = build_model(ModelConfig.from_neox(args), parallel_output=True)
            held = sum(p.numel() * p.element_size() for p in model.parameters())
            results.append([estimate_memory(args).weights, held])
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as handle:
                json.dump(results, handle)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
