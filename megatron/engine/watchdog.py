"""Hangs: a rank that stops making progress ends the job, with every rank's Python stacks.

Three things, with ``distributed_timeout_minutes`` (T) as the process groups' timeout:

- a rank waiting in a collective that a peer never joins gets the backend's timeout error after
  T; ``collective_failure`` turns it into one line naming the rank, the iteration and the
  collective (with the group's ranks), and the rank exits non-zero, so the launcher ends the job;
- the launcher ends the job with SIGTERM: ``dump_stacks_on_sigterm`` makes every rank print its
  stacks then (faulthandler writes them from the signal handler, even while the main thread is
  blocked in C code), so the rank that stopped shows where;
- ``step_watchdog`` dumps the stacks and exits if one train step takes 2T, for hangs where no
  collective times out (every rank stuck, or a group whose timeout is not ours). 2T, not T: a
  waiting rank's collective timeout, up to T after its step began, comes first and says more.
"""

from __future__ import annotations

import faulthandler
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


class CollectiveFailure(Exception):
    """A collective timed out or lost a peer."""


def dump_stacks_on_sigterm() -> None:
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)


@contextmanager
def step_watchdog(timeout_seconds: float) -> Iterator[None]:
    faulthandler.dump_traceback_later(2 * timeout_seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def collective_failure(err: BaseException, iteration: int) -> CollectiveFailure | None:
    """``err`` as a CollectiveFailure naming this rank, ``iteration`` and the collective, when
    it was raised inside a torch.distributed collective (else None)."""
    frames = [
        frame
        for frame, _ in traceback.walk_tb(err.__traceback__)
        if frame.f_code.co_filename.endswith("distributed_c10d.py")
    ]
    if not frames or not dist.is_initialized():
        return None
    collective = frames[-1]  # the innermost: the collective itself, not a helper around it
    group = collective.f_locals.get("group")
    try:
        ranks = dist.get_process_group_ranks(group) if group is not None else None
    except (ValueError, RuntimeError):  # not a group this rank can describe
        ranks = None
    over = f"ranks {ranks}" if ranks is not None else "all ranks"
    text = " ".join(str(err).split())
    return CollectiveFailure(
        f"rank {dist.get_rank()}, iteration {iteration}: {collective.f_code.co_name} over {over} "
        f"failed: {text}. A rank of that group stopped making progress or died: this rank's "
        "stack is above, the others print theirs as the launcher stops them"
    )
