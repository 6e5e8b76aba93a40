"""Shared start of the entry points: read the config the launcher passed, turn known input errors
into one clear message and a non-zero exit instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from megatron.checkpoint import CheckpointError
from megatron.cli import exit_status
from megatron.config import ConfigError, NeoXArgs
from megatron.data.indexed_dataset import DatasetError
from megatron.engine.nonfinite import NonFiniteSteps
from megatron.engine.watchdog import CollectiveFailure
from megatron.preemption import PREEMPTED_EXIT, Preempted

# Expected failures, reported as one line: bad input, and a run that stopped itself.
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DatasetError,
    FileNotFoundError,
    NonFiniteSteps,
    CollectiveFailure,
)


def run_entry_point(main: Callable, argv: list[str] | None = None) -> int:
    def work() -> int:
        try:
            main(NeoXArgs.consume_neox_args(argv))
            status = 0
        except Preempted as stopped:
            print(f"preempted: {stopped}", flush=True)
            status = PREEMPTED_EXIT
        # Left to interpreter shutdown, the process group's threads can be torn down in an
        # order that aborts the process after its work is done.
        if dist.is_initialized():
            dist.destroy_process_group()
        return status

    return exit_status(work, USER_ERRORS)
