"""Model construction time and peak memory per rank: tensor-parallel ranks against one process.

    .venv/bin/python benchmarks/init.py [--tp 4] [--layers 8] [--hidden 2048] [--rounds 3]

Builds GPTModel from a ModelConfig alone (~610M parameters at the defaults: 8 layers, hidden
2048, untied GPT-2-sized vocabulary of 50432 rows) in fresh processes: one process, then each
rank of a --tp group (gloo, one process per rank). Two initialisations:

    shard_local   what Strata does: each rank draws only the rows of its slice
    full_tensor   the previous way, for comparison: every rank initialises every full weight
                  and keeps its slice (forced by hiding ElementwiseInit from the layers)

Per configuration: the CPU seconds of the construction (rank 0; CPU time, since the ranks share
this machine's cores), its wall seconds, and the growth of the peak resident memory during it.
Rounds alternate the configurations; medians are reported, with the ratios rank / one process.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("shard_local", "full_tensor")


def model_config(layers: int, hidden: int):
    from megatron.model import ModelConfig

    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        padded_vocab_size=50432,  # GPT-2's 50257 tokens, divisible by 128 x 4
        max_position_embeddings=2048,
        pos_emb="rotary",
        no_weight_tying=True,
        init_method="small_init",
        output_layer_init_method="wang_init",
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rank: int, world: int, port: int, mode: str, layers: int, hidden: int, out: str):
    import megatron.mpu.layers as mpu_layers
    from megatron.model import GPTModel
    from megatron.model.gpt_model import count_parameters
    from megatron.mpu import destroy_model_parallel, initialize_model_parallel

    torch.set_num_threads(1)
    if mode == "full_tensor":  # every weight takes the full-tensor path
        mpu_layers.ElementwiseInit = type("NotElementwise", (), {})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        initialize_model_parallel(tensor_parallel_size=world)
        config = model_config(layers, hidden)
        dist.barrier()
        baseline = peak_rss_mb()
        cpu, wall = time.process_time(), time.perf_counter()
        model = GPTModel(config)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        result = {
            "cpu_s": cpu,
            "wall_s": wall,
            "peak_rss_growth_mb": peak_rss_mb() - baseline,
            "parameters_on_rank": count_parameters(model),
        }
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(world: int, mode: str, layers: int, hidden: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(worker, args=(world, free_port(), mode, layers, hidden, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    cli = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for _ in range(cli.rounds):
        for mode in MODES:
            for world in (1, cli.tp):
                runs.setdefault(f"{mode}/tp{world}", []).append(
                    measure(world, mode, cli.layers, cli.hidden)
                )
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }

    def ratio(mode: str, key: str) -> float:
        return round(medians[f"{mode}/tp{cli.tp}"][key] / medians[f"{mode}/tp1"][key], 3)

    report = {
        "benchmark": "model_init",
        "model": {"layers": cli.layers, "hidden": cli.hidden, "vocab_rows": 50432},
        "parameters": medians["shard_local/tp1"]["parameters_on_rank"],
        "tp": cli.tp,
        "rounds": cli.rounds,
        "median": {
            name: {k: round(v, 3) for k, v in values.items()} for name, values in medians.items()
        },
        "rank_over_one_process": {
            mode: {
                "cpu": ratio(mode, "cpu_s"),
                "wall": ratio(mode, "wall_s"),
                "peak_rss_growth": ratio(mode, "peak_rss_growth_mb"),
            }
            for mode in MODES
        },
        "shard_local_over_full_tensor_cpu": {
            f"tp{w}": round(
                medians[f"shard_local/tp{w}"]["cpu_s"] / medians[f"full_tensor/tp{w}"]["cpu_s"], 3
            )
            for w in (1, cli.tp)
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
