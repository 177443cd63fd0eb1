"""The one home of the data stages' process pools (ingest, augment): what ``workers: null``
means, and an ordered map over a pool of fresh processes.

Workers are spawned, never forked: the caller may have imported TensorFlow, whose threads do
not survive a fork. A map keeps a few tasks per worker in flight and yields results in input
order, so the output does not depend on the worker count and memory does not grow with the
input. One worker, or one task, runs in this process with no pool at all.

>>> tasks = [["a"], ["b", "c"]]
>>> with Workers(resolve(None, len(tasks))) as pool:
...     sizes = list(pool.map(len, tasks))
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from imgpipe.core.errors import InputError

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_PER_WORKER = 2
"""Tasks queued per worker: one running, one waiting, so no worker idles between tasks."""


def cpu_count() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU limit (a
    container's ``limits.cpu``, which Kubernetes writes to ``cpu.max``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def resolve(workers: int | None, tasks: int, tasks_per_worker: int = 1) -> int:
    """The processes to use for ``tasks`` units of work: ``workers`` as given (a params
    value), never more than there are tasks; None: every core this process may use, but
    one per ``tasks_per_worker`` at most, so that each repays its start (imports)."""
    if workers is None:
        return max(1, min(cpu_count(), tasks // tasks_per_worker))
    return max(1, min(workers, tasks))


def batches(items: Sequence[T], workers: int, largest: int) -> list[Sequence[T]]:
    """``items`` in consecutive batches of at most ``largest``, at least four per worker when
    there are that few items, so small inputs still spread over every worker."""
    size = max(1, min(largest, math.ceil(len(items) / (4 * workers))))
    return [items[i : i + size] for i in range(0, len(items), size)]


class Workers:
    """``workers`` spawned processes (started on the first map that has two or more tasks), or
    this process alone when ``workers`` is 1."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise InputError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> Iterator[R]:
        """``fn`` over ``tasks``, results in input order; ``fn`` must be a module-level
        function (or a ``functools.partial`` of one) and its tasks picklable."""
        if self.workers == 1 or len(tasks) < 2:
            yield from map(fn, tasks)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        pending: deque[Future[R]] = deque()
        try:
            for task in tasks:
                pending.append(self._pool.submit(fn, task))
                if len(pending) >= IN_FLIGHT_PER_WORKER * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error, or a caller that stopped reading: drop what is still queued
            for future in pending:
                future.cancel()
