"""Process start-up: distributed environment, process groups and seeds."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from megatron.engine.watchdog import dump_stacks_on_sigterm

# Launchers that do not set torch's variables: map theirs (srun / sbatch, mpirun).
_RANK_SOURCES = {
    "RANK": ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
    "WORLD_SIZE": ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
    "LOCAL_RANK": ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
}


def fill_distributed_env(environ=os.environ) -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK from SLURM or MPI variables when torch's are missing;
    a plain `python train.py` becomes a world of one."""
    for key, sources in _RANK_SOURCES.items():
        if key not in environ:
            value = next((environ[s] for s in sources if s in environ), None)
            environ[key] = value if value is not None else ("1" if key == "WORLD_SIZE" else "0")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in environ:
        if environ["WORLD_SIZE"] != "1":
            raise RuntimeError(
                "MASTER_PORT is not set for a multi-process run; launch with deepy.py"
            )
        from megatron.utils import free_port

        environ["MASTER_PORT"] = str(free_port())


def initialize_megatron(args) -> None:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU), build the TP × PP × DP grid and seed."""
    import deepspeed

    from megatron import mpu

    fill_distributed_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = args.distributed_backend or "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(minutes=args.distributed_timeout_minutes)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    dump_stacks_on_sigterm()
    mpu.initialize_model_parallel(
        args.model_parallel_size, max(args.pipe_parallel_size, 1), timeout=timeout
    )
    mpu.model_parallel_seed(args.seed)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
