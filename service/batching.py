"""Adaptive batching: one queue and one batch thread per model version.

While a batch runs, requests queue; when it finishes, everything queued (up to
`max_batch_size` requests) becomes the next batch. Batches therefore grow with the load and
add no waiting at all when the model is idle (no timer, no calibration phase). The batcher
keeps a running estimate of what a batch costs (fixed part + per row) and sheds a request
at once (Overloaded -> 503) when it predicts the request would wait longer than
`max_latency_ms`: queueing past that only makes every waiting client later.

Jobs reach it validated, so one bad request never fails its neighbours. A job whose request
was cancelled (timeout, failure) or whose client is gone before its batch starts is skipped:
no model work starts for it. The batch function must return exactly one result per job.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service import tracing
from service.errors import ClientGone


class Overloaded(Exception):
    """Shed: the request would have waited longer than max_latency_ms."""


@dataclass(eq=False)
class _Pending:
    job: Any
    rows: int
    future: asyncio.Future
    queued_at: float
    alive: Callable[[], bool] | None


class CostModel:
    """seconds(rows) = fixed + per_row * rows, fitted by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.fixed, self.per_row = 0.0, 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + rows, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + rows * rows, d * self.sxy + rows * seconds
        var = self.n * self.sxx - self.sx * self.sx
        if var > 1e-9:
            slope = (self.n * self.sxy - self.sx * self.sy) / var
            self.per_row = max(slope, 0.0)
            self.fixed = max((self.sy - self.per_row * self.sx) / self.n, 0.0)
        else:  # every batch had the same size so far: split evenly
            self.fixed, self.per_row = 0.0, self.sy / max(self.sx, 1e-9)

    def seconds(self, rows: int, batches: int) -> float:
        return self.fixed * batches + self.per_row * rows


class Batcher:
    def __init__(
        self,
        name: str,
        fn: Callable[[list[Any]], list[Any]],
        *,
        executor: concurrent.futures.Executor,
        enabled: bool = True,
        max_batch_size: int = 64,
        max_latency_ms: float = 2000,
        max_batch_rows: int = 0,
        on_batch: Callable[[str, int, int, float], None] | None = None,
    ):
        self.name, self.fn, self.executor = name, fn, executor
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_latency_s = max_latency_ms / 1000
        # a batch stops taking requests at this many rows (0: no cap); one larger request runs
        # alone. Merging more only to split it again makes every request in it wait for all of
        # it, and answers come in lumps
        self.max_batch_rows = max_batch_rows
        self.on_batch = on_batch  # (name, requests, rows, seconds), from the batch thread
        self.cost = CostModel()
        self.queue: collections.deque[_Pending] = collections.deque()
        self.queued_rows = 0
        self.running_until = 0.0  # predicted end of the batch in flight (monotonic)
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    def predicted_wait(self, rows: int) -> float:
        """Seconds a request of `rows` rows would wait and run if it arrived now."""
        batches_ahead = -(-len(self.queue) // self.max_batch_size) + 1
        if self.max_batch_rows:
            batches_ahead = max(batches_ahead, -(-self.queued_rows // self.max_batch_rows) + 1)
        running = max(self.running_until - time.monotonic(), 0.0)
        return running + self.cost.seconds(self.queued_rows + rows, batches_ahead)

    def admit(self, rows: int, spent_s: float = 0.0) -> None:
        """Shed now if the request would be late (call before doing work for it); `spent_s`:
        what the request has already waited (for a slot, its body), which counts too."""
        if self.queue and spent_s + self.predicted_wait(rows) > self.max_latency_s:
            raise Overloaded(f"{self.name} is overloaded: the request would wait too long")

    async def submit(self, job: Any, rows: int, alive: Callable[[], bool] | None = None, spent_s: float = 0.0) -> Any:
        """One validated job in, its result out (batched with concurrent jobs)."""
        self.admit(rows, spent_s)
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(job, rows, fut, time.monotonic(), alive))
        self.queued_rows += rows
        self._wake.set()
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            batch: list[_Pending] = []
            taken = 0
            while self.queue and len(batch) < self.max_batch_size:
                p = self.queue[0]
                if batch and self.max_batch_rows and taken + p.rows > self.max_batch_rows:
                    break  # it starts the next batch
                self.queue.popleft()
                self.queued_rows -= p.rows
                if p.future.done():  # cancelled: timed out or failed while queued
                    continue
                if p.alive is not None and not p.alive():  # the client hung up while queued
                    p.future.set_exception(ClientGone())
                    continue
                batch.append(p)
                taken += p.rows
            if not batch:
                continue
            rows = sum(p.rows for p in batch)
            start = time.monotonic()
            traced = tracing.TRACER is not None and time.perf_counter()
            self.running_until = start + self.cost.seconds(rows, 1)
            try:
                results = await loop.run_in_executor(self.executor, self._run, [p.job for p in batch], rows)
            except Exception as exc:  # the batch failed: every request in it gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self.running_until = 0.0
            if traced:
                tracing.batch(self.name, [p.job for p in batch], rows, traced, time.perf_counter() - traced)
            for p, r in zip(batch, results):
                if hasattr(p.job, "queued_s"):
                    p.job.queued_s = start - p.queued_at
                if not p.future.done():
                    p.future.set_result(r)

    def _run(self, jobs: list[Any], rows: int) -> Sequence[Any]:
        start = time.perf_counter()
        results = self.fn(jobs)
        seconds = time.perf_counter() - start
        if len(results) != len(jobs):  # the batching contract: one result per request
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(jobs)} requests")
        self.cost.observe(rows, seconds)
        for job in jobs:
            if hasattr(job, "infer_s"):
                job.infer_s = seconds
        if self.on_batch is not None:
            self.on_batch(self.name, len(jobs), rows, seconds)
        return results

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        while self.queue:
            p = self.queue.popleft()
            if not p.future.done():
                p.future.cancel()
