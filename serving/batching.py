"""Server-side batching like TF Serving's ``--enable_batching``: concurrent requests to one
signature are merged along dimension 0 into one model call of at most ``max_batch_size`` rows,
waiting at most ``batch_timeout_s`` for a batch to fill, then the outputs are split back.

Requests whose inputs cannot be stacked with each other (other trailing shapes) go in different
batches; a request larger than ``max_batch_size`` runs on its own. When ``max_enqueued_batches``
batches are already waiting, a new request is refused with :class:`QueueFull` (the server answers
UNAVAILABLE, as TF Serving does, so clients back off and retry), so overload shows up as fast
errors instead of unbounded latency.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

Inputs = dict[str, np.ndarray]
Run = Callable[[Inputs], dict[str, np.ndarray]]


class QueueFull(RuntimeError):
    """Too many batches are waiting."""


class _Task:
    __slots__ = ("future", "inputs", "key", "rows")

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.rows = int(next(iter(inputs.values())).shape[0])
        self.key = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))
        self.future: Future[dict[str, np.ndarray]] = Future()


class Batcher:
    def __init__(
        self,
        run: Run,
        *,
        max_batch_size: int,
        batch_timeout_s: float,
        num_batch_threads: int,
        max_enqueued_batches: int,
        name: str = "batcher",
    ) -> None:
        self.run, self.max_batch_size, self.timeout = run, max_batch_size, batch_timeout_s
        self.capacity = max(1, max_enqueued_batches) * max_batch_size
        self.queue: queue.Queue[_Task | None] = queue.Queue()
        self.pending_rows = 0
        self.lock = threading.Lock()
        self.batches = 0
        self.closed = False
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, num_batch_threads))
        ]
        for thread in self.threads:
            thread.start()

    def __call__(self, inputs: Inputs) -> dict[str, np.ndarray]:
        task = _Task(inputs)
        if task.rows == 0 or task.rows > self.max_batch_size:
            return self.run(inputs)
        with self.lock:  # enqueue under the lock: a task is never queued behind close()
            if self.closed:
                direct = True
            else:
                direct = False
                if self.pending_rows + task.rows > self.capacity:
                    raise QueueFull(
                        f"batch queue full ({self.pending_rows} rows waiting, capacity "
                        f"{self.capacity}): retry later"
                    )
                self.pending_rows += task.rows
                self.queue.put(task)
        return self.run(inputs) if direct else task.future.result()

    def close(self) -> None:
        """Stop the workers after every queued task has run."""
        with self.lock:
            self.closed = True
            for _ in self.threads:
                self.queue.put(None)
        for thread in self.threads:
            thread.join(timeout=30)

    def _collect(self, first: _Task) -> tuple[list[_Task], list[_Task]]:
        """``first`` plus whatever compatible tasks arrive before the timeout or the size cap;
        incompatible ones are handed back."""
        batch, other = [first], []
        rows = first.rows
        deadline = time.monotonic() + self.timeout
        while rows < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                task = (
                    self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                )
            except queue.Empty:
                break
            if task is None:
                self.queue.put(None)  # keep the shutdown signal for this or another worker
                break
            if task.key == first.key and rows + task.rows <= self.max_batch_size:
                batch.append(task)
                rows += task.rows
            else:
                other.append(task)
                if task.key == first.key:
                    break  # the batch is full
        return batch, other

    def _drain(self) -> None:
        """At shutdown: run whatever was put back behind the stop signal, and hand the other
        workers' stop signals back to them."""
        signals = 0
        while True:
            try:
                task = self.queue.get_nowait()
            except queue.Empty:
                break
            if task is None:
                signals += 1
            else:
                self._execute([task])
        for _ in range(signals):
            self.queue.put(None)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                self._drain()
                return
            batch, other = self._collect(first)
            for task in other:
                self.queue.put(task)
            self._execute(batch)

    def _execute(self, batch: list[_Task]) -> None:
        with self.lock:
            self.pending_rows -= sum(t.rows for t in batch)
            self.batches += 1
        try:
            merged = {
                name: np.concatenate([t.inputs[name] for t in batch]) for name in batch[0].inputs
            }
            outputs = self.run(merged)
            start = 0
            for task in batch:
                task.future.set_result(
                    {k: v[start : start + task.rows] for k, v in outputs.items()}
                )
                start += task.rows
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
            else:
                # One bad request must not fail its neighbours: rerun them one by one.
                for task in batch:
                    try:
                        task.future.set_result(self.run(task.inputs))
                    except Exception as single:
                        task.future.set_exception(single)
