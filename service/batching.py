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

from service import priority, tracing
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
        gate: priority.Gate | None = None,
        on_shed: Callable[[str, int], None] | None = None,
    ):
        self.name, self.fn, self.executor = name, fn, executor
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_latency_s = max_latency_ms / 1000
        # a batch stops taking requests at this many rows (0: no cap); one larger request runs
        # alone. Merging more only to split it again makes every request in it wait for all of
        # it, and answers come in lumps
        self.max_batch_rows = max_batch_rows
        self.on_batch = on_batch  # (name, requests, rows, seconds), from the batch thread
        self.on_shed = on_shed  # (name, class) for each queued request shed for higher-class work
        self.gate = gate or priority.Gate(0.1, max_batch_rows or 512, 1.0)  # a private one: classes still order
        self.cost = CostModel()
        self.queues: tuple[collections.deque[_Pending], ...] = tuple(collections.deque() for _ in priority.CLASSES)
        self.rows_by_class = [0] * len(priority.CLASSES)
        self.n_queued = 0  # requests queued, every class
        self.last_start = [0.0] * len(priority.CLASSES)  # when each class's last batch started
        self.running_until = 0.0  # predicted end of the batch in flight (monotonic)
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    @property
    def queue(self) -> list[_Pending]:
        """Every queued request, highest class first."""
        return [p for q in self.queues for p in q]

    @property
    def queued_rows(self) -> int:
        return sum(self.rows_by_class)

    def idle(self) -> bool:
        return not self.n_queued and not self.running_until

    def predicted_wait(self, rows: int, cls: int = priority.INTERACTIVE) -> float:
        """Seconds a request of `rows` rows and class `cls` would wait and run if it arrived
        now: the batch in flight, then what is queued at its class or above."""
        if cls == priority.INTERACTIVE:
            ahead, ahead_rows = len(self.queues[0]), self.rows_by_class[0]
        else:
            ahead, ahead_rows = sum(map(len, self.queues[: cls + 1])), sum(self.rows_by_class[: cls + 1])
        batches_ahead = -(-ahead // self.max_batch_size) + 1
        if self.max_batch_rows:
            batches_ahead = max(batches_ahead, -(-ahead_rows // self.max_batch_rows) + 1)
        running = max(self.running_until - time.monotonic(), 0.0)
        return running + self.cost.seconds(ahead_rows + rows, batches_ahead)

    def admit(self, rows: int, spent_s: float = 0.0, cls: int = priority.INTERACTIVE) -> None:
        """Shed now if the request would be late (call before doing work for it); `spent_s`:
        what the request has already waited (for a slot, its body), which counts too. Queued
        requests of lower classes are shed first, lowest first (service.priority)."""
        if cls == priority.SHADOW:
            if not self.gate.spare() or any(self.queues[: priority.SHADOW]):
                self._count_shed(cls)
                raise Overloaded(f"{self.name}: no spare capacity for shadow work")
            return
        n_queued = self.n_queued
        if not n_queued:  # nothing queued: nobody to be late behind, nothing to shed
            return
        own = len(self.queues[0]) if not cls else sum(map(len, self.queues[: cls + 1]))
        if own and spent_s + self.predicted_wait(rows, cls) > self.max_latency_s:
            self._count_shed(cls)
            raise Overloaded(f"{self.name} is overloaded: the request would wait too long")
        if own == n_queued:  # no lower-class work queued: nothing to make room with
            return
        # the whole queue past the limit: lower classes make room, lowest and newest first
        while spent_s + self.predicted_wait(rows, priority.SHADOW) > self.max_latency_s and self._shed_lower(cls):
            pass

    def _shed_lower(self, cls: int) -> bool:
        """Shed the newest queued request of the lowest class below `cls`; False if none."""
        for lower in range(len(self.queues) - 1, cls, -1):
            q = self.queues[lower]
            if q:
                p = q.pop()
                self._left_queue(p, lower)
                if not p.future.done():
                    p.future.set_exception(Overloaded(f"{self.name}: shed for higher-priority work"))
                self._count_shed(lower)
                return True
        return False

    def _count_shed(self, cls: int) -> None:
        if self.on_shed is not None:
            self.on_shed(self.name, cls)

    def _left_queue(self, p: _Pending, cls: int) -> None:
        self.n_queued -= 1
        self.rows_by_class[cls] -= p.rows
        self.gate.finished(cls, queued=True)

    async def submit(
        self,
        job: Any,
        rows: int,
        alive: Callable[[], bool] | None = None,
        spent_s: float = 0.0,
        cls: int = priority.INTERACTIVE,
        admit: bool = True,
    ) -> Any:
        """One validated job in, its result out (batched with concurrent jobs of its class).
        `admit=False`: no admission check (a version's warm-up, bounded and never a client's
        request); queued, it can still be shed to make room for higher classes."""
        if admit:
            self.admit(rows, spent_s, cls)
        if self._loop_task is None or self._loop_task.done():  # first use, or a late job for a closed version
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")
        fut = asyncio.get_running_loop().create_future()
        self.queues[cls].append(_Pending(job, rows, fut, time.monotonic(), alive))
        self.n_queued += 1
        self.rows_by_class[cls] += rows
        gate = self.gate  # gate.queued(cls), inline: once per request on the normal path
        gate.demand[cls] += 1
        gate.waiting[cls] += 1
        self._wake.set()
        return await fut

    def _take(self, cls: int) -> list[_Pending]:
        """The next batch, of class `cls`, up to its limits; skipped requests (cancelled,
        client gone, shadow work past its wait) are settled on the way."""
        self.last_start[cls] = time.monotonic()
        q, now = self.queues[cls], time.monotonic()
        max_rows = self.max_batch_rows if cls == priority.INTERACTIVE else self.gate.chunk_rows
        batch: list[_Pending] = []
        taken = 0
        while q and len(batch) < self.max_batch_size:
            p = q[0]
            if batch and max_rows and taken + p.rows > max_rows:
                break  # it starts the next batch
            q.popleft()
            if p.future.done():  # cancelled: timed out or failed while queued
                self._left_queue(p, cls)
                continue
            if p.alive is not None and not p.alive():  # the client hung up while queued
                self._left_queue(p, cls)
                p.future.set_exception(ClientGone())
                continue
            if cls == priority.SHADOW and now - p.queued_at > self.gate.shadow_max_wait_s:
                self._left_queue(p, cls)
                p.future.set_exception(Overloaded(f"{self.name}: shadow work waited too long"))
                continue
            self.n_queued -= 1
            self.rows_by_class[cls] -= p.rows
            batch.append(p)
            taken += p.rows
        self.gate.started(cls, len(batch))
        return batch

    def _expire_shadow(self) -> None:
        """Drop shadow jobs that waited past the gate's shadow wait (they never run late)."""
        q, now = self.queues[priority.SHADOW], time.monotonic()
        while q and now - q[0].queued_at > self.gate.shadow_max_wait_s:
            p = q.popleft()
            self._left_queue(p, priority.SHADOW)
            if not p.future.done():
                p.future.set_exception(Overloaded(f"{self.name}: shadow work waited too long"))

    def _since(self, cls: int) -> float:
        """When the head of class `cls` began to wait: its arrival, or the start of this
        batcher's last batch of that class, whichever is later."""
        return max(self.queues[cls][0].queued_at, self.last_start[cls])

    def _pick(self) -> int:
        """The class of the next batch: the highest waiting, unless a batch-class head has
        waited the gate's max wait (no starvation; shadow work never ages, it is dropped)."""
        q0, q1 = self.queues[0], self.queues[1]
        top = 0 if q0 else 1 if q1 else 2
        aged = self.queues[priority.BATCH] and time.monotonic() - self._since(priority.BATCH) >= self.gate.max_wait_s
        return priority.BATCH if top == priority.INTERACTIVE and aged else top

    def _may_start(self, cls: int) -> bool:
        if not self.gate.blocks(cls):
            return True
        if cls == priority.BATCH and time.monotonic() - self._since(cls) >= self.gate.max_wait_s:
            self.gate.aged[cls] += 1
            return True
        return False

    async def _wait_for_gate(self, cls: int) -> None:
        """Until higher-class demand in the worker ends, a job reaches this batcher, or (batch
        class) the head's max wait is over."""
        left = self.gate.shadow_max_wait_s if cls == priority.SHADOW else self.gate.max_wait_s
        left = self._since(cls) + left - time.monotonic()
        self._wake.clear()
        changed = asyncio.ensure_future(self.gate.changed().wait())
        woke = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((changed, woke), timeout=max(left, 0.001), return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            woke.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.n_queued:
                self._wake.clear()
                await self._wake.wait()
            cls = self._pick()
            if cls > priority.INTERACTIVE and not self._may_start(cls):
                await self._wait_for_gate(cls)
                if cls == priority.SHADOW:
                    self._expire_shadow()
                continue
            batch = self._take(cls)
            if not batch:
                continue
            rows = sum(p.rows for p in batch)
            start = time.monotonic()
            traced = tracing.TRACER is not None and time.perf_counter()
            self.running_until = start + self.cost.seconds(rows, 1)
            try:
                results = await loop.run_in_executor(self.executor, self._run, [p.job for p in batch], rows, cls)
            except Exception as exc:  # the batch failed: every request in it gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self.running_until = 0.0
                self.gate.finished(cls, len(batch))
            if traced:
                tracing.batch(self.name, [p.job for p in batch], rows, traced, time.perf_counter() - traced)
            for p, r in zip(batch, results):
                if hasattr(p.job, "queued_s"):
                    p.job.queued_s = start - p.queued_at
                if not p.future.done():
                    p.future.set_result(r)

    def _run(self, jobs: list[Any], rows: int, cls: int = priority.INTERACTIVE) -> Sequence[Any]:
        start = time.perf_counter()
        if cls:  # this batch thread runs lower-class work (metrics leave shadow runs out)
            with priority.running_as(cls):
                results = self.fn(jobs)
        else:
            results = self.fn(jobs)
        seconds = time.perf_counter() - start
        if len(results) != len(jobs):  # the batching contract: one result per request
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(jobs)} requests")
        self.cost.observe(rows, seconds)
        for job in jobs:
            if hasattr(job, "infer_s"):
                job.infer_s = seconds
                job.batch_rows = rows
        if self.on_batch is not None and cls != priority.SHADOW:
            self.on_batch(self.name, len(jobs), rows, seconds)
        return results

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        for cls, q in enumerate(self.queues):
            while q:
                p = q.popleft()
                self._left_queue(p, cls)
                if not p.future.done():
                    p.future.cancel()
