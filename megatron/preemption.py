"""Stop cleanly when the scheduler asks: SIGUSR1 (SLURM's warning before the time limit or a
preemption, `--signal=USR1@T`) and, inside a SLURM job, SIGTERM. The trainer finishes its step,
every rank agrees on the step to stop after, saves, and exits with PREEMPTED_EXIT, which
tools/slurm/pretrain.sbatch answers by requeueing the job."""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved, start me again


class Preempted(Exception):
    """Raised after the checkpoint is saved; the entry point exits with PREEMPTED_EXIT."""


def stop_signals() -> list[signal.Signals]:
    # Outside SLURM a SIGTERM (e.g. torchrun tearing the job down after a failure) must not
    # start a save that waits on ranks that are gone.
    return [signal.SIGUSR1] + ([signal.SIGTERM] if os.environ.get("SLURM_JOB_ID") else [])


class StopRequest:
    """Records a stop signal; `agreed()` tells every rank the same answer after a step."""

    def __init__(self):
        self.received: int | None = None
        self.group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            # A CPU all-reduce: no device synchronisation in the step loop.
            self.group = dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                signal.signal(sig, self._receive)

    def _receive(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Whether any rank has received a stop signal (a collective: call it on every rank
        after the same step)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def describe(self) -> str:
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        return name
