"""Muon's optimizer step against AdamW's on the same model, and its orthogonalisation shared
by 2 data-parallel ranks against done by 1.

    .venv/bin/python benchmarks/muon.py [--layers 4] [--hidden 1024] [--rounds 5] [--ns-dtype fp32]

Builds GPTModel (untied GPT-2-sized vocabulary) and gives every parameter a fixed random
gradient, then times ``optimizer.step()``:

    adamw         the registry's "adam" (torch AdamW)
    muon          the registry's "muon": Newton-Schulz on each logical matrix of every block,
                  AdamW for the embedding, the head, norms and biases
    orthogonalize_dp1   the step's orthogonalisation phase (Muon.orthogonal_updates): every
                        logical matrix, in one process
    orthogonalize_dp2   the same in each of 2 gloo processes forming one data-parallel group:
                        each orthogonalises its share of the matrices (balanced by size) and
                        the results are broadcast

Times are wall seconds with one thread per process, medians over rounds (after one warm-up
step for the steps, which creates the state); ratios muon / adamw and orthogonalize dp2 / dp1.
Prints one JSON object. The two ranks share this machine's cores: the ratio means something
only with 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.init import free_port, model_config  # noqa: E402


def build(kind: str, layers: int, hidden: int, ns_dtype: str):
    """(model with fixed gradients, optimizer ``kind``) as build_optimizer makes them."""
    from megatron.model import GPTModel
    from megatron.optimizers import OPTIMIZERS, get_param_groups
    from megatron.optimizers.matrices import mark_logical_matrices

    torch.manual_seed(0)
    model = GPTModel(model_config(layers, hidden))
    mark_logical_matrices(model)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    groups = get_param_groups(model.named_parameters(), 0.01)
    for group in groups:
        group["lr"] = 1e-3
    params = {"lr": 1e-3} | ({"ns_dtype": ns_dtype} if kind == "muon" else {})
    return model, OPTIMIZERS[kind](groups, params)


def time_steps(optimizer: torch.optim.Optimizer, rounds: int) -> float:
    optimizer.step()  # creates the state
    times = []
    for _ in range(rounds):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_orthogonalize(optimizer, rounds: int) -> float:
    """Median seconds of the orthogonalisation phase of a step: this rank's share of the
    matrices and the exchange of the results (the momentum directions taken as the gradients)."""
    matrices = [
        (group, p) for group in optimizer.param_groups if group["use_muon"] for p in group["params"]
    ]
    directions = [p.grad for _, p in matrices]
    times = []
    for _ in range(rounds):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        optimizer.orthogonal_updates(matrices, directions)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data_parallel_worker(rank: int, port: int, cli: argparse.Namespace, out: str) -> None:
    from megatron.mpu import initialize_model_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    initialize_model_parallel(1, 1)
    _, optimizer = build("muon", cli.layers, cli.hidden, cli.ns_dtype)
    seconds = time_orthogonalize(optimizer, cli.rounds)
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ns-dtype", choices=("bf16", "fp32"), default="fp32")
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each data-parallel rank runs
    seconds = {}
    for kind in ("adam", "muon"):
        _, optimizer = build(kind, cli.layers, cli.hidden, cli.ns_dtype)
        seconds["adamw" if kind == "adam" else kind] = time_steps(optimizer, cli.rounds)
    seconds["orthogonalize_dp1"] = time_orthogonalize(optimizer, cli.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(data_parallel_worker, args=(free_port(), cli, out), nprocs=2)
        seconds["orthogonalize_dp2"] = json.loads(Path(out).read_text())
    report = {
        "benchmark": "muon",
        "model": {"layers": cli.layers, "hidden": cli.hidden, "vocab_rows": 50432},
        "ns_dtype": cli.ns_dtype,
        "rounds": cli.rounds,
        "threads_per_process": 1,
        "median_s": {name: round(value, 4) for name, value in seconds.items()},
        "muon_over_adamw": round(seconds["muon"] / seconds["adamw"], 3),
        "orthogonalize_dp2_over_dp1": round(
            seconds["orthogonalize_dp2"] / seconds["orthogonalize_dp1"], 3
        ),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
