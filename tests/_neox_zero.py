"""Writes a real DeepSpeed ZeRO-1 checkpoint of a GPT-NeoX model for tests/test_neox_checkpoints.py.

    python tests/_neox_zero.py NEOX_MP_RANK_FILE OUT_DIR ITERATION

Builds a module with the NeoX state dict's names (sequential.N....), takes one Adam step on
sum(p^2) under ZeRO stage 1 on CPU and saves OUT_DIR/global_step{ITERATION} as GPT-NeoX does
(DeepSpeed's save_checkpoint with GPT-NeoX's client state). Run in its own process.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn


def module_from(state: dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(tensor.clone().float()))
    return root


def main(source: str, out: str, iteration: int) -> None:
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    import deepspeed

    state = torch.load(source, weights_only=True)["module"]
    model = module_from({k: v for k, v in state.items() if not k.endswith("inv_freq")})
    config = {
        "train_batch_size": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}},
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    engine.backward(sum((p**2).sum() for p in engine.module.parameters()))
    engine.step()
    client = {"iteration": iteration, "args": {"model_parallel_size": 1}}
    engine.save_checkpoint(out, tag=f"global_step{iteration}", client_state=client)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
