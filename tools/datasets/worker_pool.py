"""An order-preserving map over worker processes with a bounded number of tasks in flight."""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import AsyncResult
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

PENDING_PER_WORKER = 4  # tasks in flight per worker: with bounded tasks this bounds memory


def _init_worker(initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    # Ctrl-C reaches the whole process group; the main process cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)


def ordered_map(
    func: Callable[[T], R],
    tasks: Iterable[T],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """`func` over `tasks` in input order. `initializer(*initargs)` prepares each process's
    module state (in this process when `workers == 1`)."""
    if workers == 1:
        initializer(*initargs)
        yield from map(func, tasks)
        return
    # spawn, not fork: the caller may already hold torch or tokenizer threads.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(initializer, initargs)) as pool:
        pending: deque[AsyncResult] = deque()
        for task in tasks:
            pending.append(pool.apply_async(func, (task,)))
            if len(pending) >= PENDING_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
