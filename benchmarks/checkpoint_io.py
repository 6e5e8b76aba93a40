"""Checkpoint save and load at DP=4 and TP=2 x DP=2: Strata's per-process checkpoints against
torch.distributed.checkpoint (DCP) saving the same state, in the same run.

    .venv/bin/python benchmarks/checkpoint_io.py [--layers 8] [--hidden 1536] [--rounds 3]

Four gloo processes build GPTModel (bf16; ~380M parameters at the defaults: 8 layers, hidden
1536, untied GPT-2-sized vocabulary) under DeepSpeed ZeRO-1 with AdamW, its fp32 master and
moments created: 5.3 GB of checkpoint. (Four processes holding a 1B model's weights, master,
moments and an asynchronous snapshot need more than this 24 GiB machine has.) Per layout and
round (the two sides alternate which goes first):

    strata_save    save_checkpoint: each process writes its pieces (model, master, moments),
                   hashing them (sha256) as it writes
    strata_async   CheckpointSaver with async_save (one for the run, as in training): the
                   stall (until training could go on) and the time until it is published
    dcp_save       dcp.save of the same tensors: each rank's tensor-parallel weights (replicated
                   over data-parallel ranks: DCP writes them once) and its ZeRO fragments
    strata_load    load_checkpoint into the same model and optimizer, every file's sha256
                   checked first (shared over the ranks)
    strata_load_unverified   the same with verify_checkpoint false (DCP checks no digest)
    dcp_load       dcp.load of the same tensors, in place

Times are rank 0's between barriers (the job's time); memory is the largest growth of any
rank's anonymous resident memory during the operation (sampled every 5 ms; the largest over
rounds); bytes are what rank 0 wrote, against the checkpoint's total / world. Times are medians
over rounds; ratios Strata / DCP. Prints one JSON object. Both writers fsync their files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.init import free_port, model_config  # noqa: E402

LAYOUTS = {"dp4": (1, 4), "tp2_dp2": (2, 2)}  # name -> (tensor parallel, data parallel)
OPERATIONS = (
    "strata_save",
    "strata_async",
    "dcp_save",
    "strata_load",
    "strata_load_unverified",
    "dcp_load",
)


class PeakRSS:
    """The largest growth of anonymous resident memory while the block runs, sampled by a
    thread."""

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *_) -> None:
        self.running = False
        self.thread.join()
        self.growth_mb = (self.peak - self.baseline) / 2**20


def _rss() -> int:
    """Resident memory that is not file-backed: mapped checkpoint pages (safetensors reads
    through mmap) are page cache, not memory the process holds."""
    with open("/proc/self/statm") as handle:
        _, resident, shared, *_ = map(int, handle.read().split())
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


def build(tp: int, dp: int, layers: int, hidden: int):
    """The engine's module and optimizer, with the optimizer states created."""
    import dataclasses

    import deepspeed

    from megatron import mpu
    from megatron.checkpoint.optimizer_state import OptimizerView
    from megatron.model import GPTModel

    config = dataclasses.replace(model_config(layers, hidden), params_dtype=torch.bfloat16)
    model = GPTModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_batch_size": dp,
            "train_micro_batch_size_per_gpu": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7},
            "steps_per_print": 10**9,
        },
        mpu=mpu,
        dist_init_required=False,
    )
    params = [p for p in engine.module.parameters()]
    OptimizerView(engine.optimizer, params).materialize()
    return engine.module, engine.optimizer


def dcp_state(module, optimizer) -> dict[str, torch.Tensor]:
    """The same tensors as a Strata checkpoint, as DCP takes them: weights keyed by their
    tensor-parallel rank (equal keys on data-parallel replicas, which DCP writes once) and each
    rank's master and moment fragments under keys of their own."""
    from megatron import mpu
    from megatron.checkpoint.optimizer_state import MASTER, OptimizerView
    from megatron.checkpoint.parameters import (
        canonical_named_parameters,
        is_tensor_parallel_split,
    )

    named = canonical_named_parameters(module, replicas=False)
    view = OptimizerView(optimizer, [p for _, p in named])
    tp_rank = mpu.get_tensor_model_parallel_rank()
    state = {}
    for name, p in named:
        shard = f"tp{tp_rank}" if is_tensor_parallel_split(p) else "tp0"
        state[f"model/{name}/{shard}"] = p.detach()
        for key in [MASTER, *view.state_keys()]:
            held = view.fragment(p, key)
            if held is not None:
                start, values = held
                state[f"optimizer/{name}.{key}/{shard}/{start}"] = values
    return state


def folder_bytes(path: Path, rank0_only: bool) -> int:
    files = [f for f in path.rglob("*") if f.is_file()]
    if rank0_only:  # Strata: rank 0's shards, its RNG file and the metadata; DCP: __0_*
        files = [
            f
            for f in files
            if "-00001-of-" in f.name
            or f.name in ("rank0.pt", "metadata.json", ".metadata")
            or f.name.startswith("__0_")
        ]
    return sum(f.stat().st_size for f in files)


def worker(rank, world, port, tp, dp, layers, hidden, rounds, scratch, out):
    import torch.distributed.checkpoint as dcp

    from megatron.checkpoint.load import load_checkpoint
    from megatron.checkpoint.save import CheckpointSaver, save_checkpoint
    from megatron.mpu import destroy_model_parallel, initialize_model_parallel

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        initialize_model_parallel(tensor_parallel_size=tp)
        module, optimizer = build(tp, dp, layers, hidden)
        state = dcp_state(module, optimizer)
        strata = Path(scratch) / "strata"
        dcp_dir = Path(scratch) / "dcp"
        args = SimpleNamespace(save=str(strata), load=str(strata), config_files={}, zero_stage=1)
        checksum = sum(float(p.detach().float().sum()) for p in module.parameters())

        def strata_save():
            save_checkpoint(args, 1, module, optimizer, None, {})

        # One saver for the run, as in training: later saves reuse its CPU snapshot memory.
        saver = CheckpointSaver(SimpleNamespace(**vars(args), async_save=True))

        def strata_async():
            start = time.perf_counter()
            saver.save(2, module, optimizer, None, {})
            stall = time.perf_counter() - start
            saver.wait()
            return stall

        def dcp_save():
            dcp.save(state, checkpoint_id=str(dcp_dir))

        def strata_load():
            load_checkpoint(args, module, optimizer, None)

        def strata_load_unverified():
            load_checkpoint(
                SimpleNamespace(**vars(args), verify_checkpoint=False), module, optimizer, None
            )

        def dcp_load():
            dcp.load(state, checkpoint_id=str(dcp_dir))

        functions = dict(
            strata_save=strata_save,
            strata_async=strata_async,
            dcp_save=dcp_save,
            strata_load=strata_load,
            strata_load_unverified=strata_load_unverified,
            dcp_load=dcp_load,
        )
        records = []
        for round_ in range(rounds):
            # Saves before loads; the sides alternate which goes first.
            pairs = [("strata_save", "dcp_save"), ("strata_load", "dcp_load")]
            order = [op for pair in pairs for op in (pair if round_ % 2 == 0 else pair[::-1])]
            order.insert(2, "strata_async")
            order.append("strata_load_unverified")
            record = {}
            for op in order:
                dist.barrier()
                with PeakRSS() as memory:
                    start = time.perf_counter()
                    stall = functions[op]()
                    dist.barrier()
                    seconds = time.perf_counter() - start
                growth = [None] * world
                dist.all_gather_object(growth, memory.growth_mb)
                record[op] = {"s": seconds, "peak_rss_growth_mb": max(growth)}
                if stall is not None:
                    stalls = [None] * world
                    dist.all_gather_object(stalls, stall)
                    record[op]["stall_s"] = max(stalls)
                if rank == 0 and op == "strata_save":
                    folder = strata / "global_step1"
                    record["strata_bytes"] = folder_bytes(folder, False)
                    record["strata_rank0_bytes"] = folder_bytes(folder, True)
                if rank == 0 and op == "dcp_save":
                    record["dcp_bytes"] = folder_bytes(dcp_dir, False)
                    record["dcp_rank0_bytes"] = folder_bytes(dcp_dir, True)
            records.append(record)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(strata, ignore_errors=True)
                shutil.rmtree(dcp_dir, ignore_errors=True)
        # The loads put back what was saved.
        after = sum(float(p.detach().float().sum()) for p in module.parameters())
        if rank == 0:
            parameters = sum(p.numel() for p in module.parameters()) * tp
            Path(out).write_text(
                json.dumps(
                    {"records": records, "parameters": parameters, "same": after == checksum}
                )
            )
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def measure(layout: str, layers: int, hidden: int, rounds: int, scratch: str) -> dict:
    tp, dp = LAYOUTS[layout]
    out = os.path.join(scratch, "result.json")
    mp.spawn(
        worker,
        args=(tp * dp, free_port(), tp, dp, layers, hidden, rounds, scratch, out),
        nprocs=tp * dp,
    )
    return json.loads(Path(out).read_text())


def summarise(result: dict, world: int) -> dict:
    records = result["records"]

    def median(op: str, key: str) -> float:
        return statistics.median(r[op][key] for r in records)

    first = records[0]
    summary = {
        "parameters": result["parameters"],
        "loads_restore_the_weights": result["same"],
        "median_s": {op: round(median(op, "s"), 3) for op in OPERATIONS},
        "async_stall_s": round(median("strata_async", "stall_s"), 3),
        # The largest over rounds: an asynchronous saver allocates its snapshot memory once.
        "peak_rss_growth_mb": {
            op: round(max(r[op]["peak_rss_growth_mb"] for r in records), 1) for op in OPERATIONS
        },
        "bytes": {
            "strata_total": first["strata_bytes"],
            "strata_rank0": first["strata_rank0_bytes"],
            "strata_rank0_over_total_per_world": round(
                first["strata_rank0_bytes"] / (first["strata_bytes"] / world), 3
            ),
            "dcp_total": first["dcp_bytes"],
            "dcp_rank0": first["dcp_rank0_bytes"],
        },
    }
    summary["ratios"] = {
        "save_strata_over_dcp": round(median("strata_save", "s") / median("dcp_save", "s"), 3),
        "load_strata_over_dcp": round(median("strata_load", "s") / median("dcp_load", "s"), 3),
        "load_unverified_strata_over_dcp": round(
            median("strata_load_unverified", "s") / median("dcp_load", "s"), 3
        ),
        "async_stall_over_sync_save": round(
            median("strata_async", "stall_s") / median("strata_save", "s"), 3
        ),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument(
        "--scratch", default=None, help="where checkpoints go (default: a temp dir)"
    )
    cli = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    report = {"benchmark": "checkpoint_io", "rounds": cli.rounds, "layouts": {}}
    for layout in cli.layouts:
        with tempfile.TemporaryDirectory(dir=cli.scratch) as scratch:
            result = measure(layout, cli.layers, cli.hidden, cli.rounds, scratch)
        tp, dp = LAYOUTS[layout]
        report["layouts"][layout] = summarise(result, tp * dp)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
