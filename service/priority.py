"""Priority classes across the whole worker: background work never slows a client.

Three classes, highest first:

    interactive  every request by default
    batch        a client's bulk work: header `X-Priority: batch` (or `interactive`)
    shadow       deepserve's own mirrored requests to a candidate version (service.rollout)

Each model has its own batcher and ONNX Runtime thread, so models compete for the CPU, not
for a queue. The rules, in the order a request meets them:

1. Admission (service.batching): a request's predicted wait counts only the work queued at
   its own class or above: one that would be late is shed (503 with Retry-After). When the
   whole queue would make it late, queued requests of lower classes are shed first (shadow,
   then batch, newest first, counted by class). Shadow work is admitted only in spare
   capacity (at most SPARE_QUEUE higher-class jobs waiting anywhere in the worker, at most
   `shadow_max_inflight` mirrors in flight, and within the worker's shadow CPU budget,
   `shadow_cpu_share` of a core on average: ShadowBudget); otherwise it is dropped, never
   queued. Spare queue capacity alone let a 100% shadow add half a request's CPU to every
   request at moderate load, where nothing queues but every core is shared.
2. Batches hold one class; a batcher takes its highest waiting class first.
3. The gate (this module), before every batch: an interactive batch starts at once; a
   lower-class batch waits while any higher-class job is queued or running anywhere in this
   worker, and holds at most `priority_chunk_rows` rows (at least one request), so lower-class
   work reaches the CPU in short runs and a waiting client is behind one of them at most.
   While it waits, a higher-class job that reaches the same batcher goes first.
4. No starvation: a lower-class batch that has waited `priority_max_wait_ms` at the head of
   its queue starts anyway (one batch; the next one waits again). So batch-class work always
   progresses at least one batch per max wait, however busy the interactive class is; a
   shadow job still queued after `shadow_max_wait_ms` is dropped instead (optional work).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

CLASSES = ("interactive", "batch", "shadow")
INTERACTIVE, BATCH, SHADOW = 0, 1, 2
CLIENT_CLASSES = {"interactive": INTERACTIVE, "batch": BATCH}  # what a client may ask for
SPARE_QUEUE = 2  # higher-class jobs waiting in the worker up to which shadow work is admitted

_local = threading.local()
_shadow_runs = 0  # batch threads running shadow work now: 0 on the normal path (no thread-local read)
_shadow_lock = threading.Lock()


def current() -> int:
    """The class of the batch this thread is running (interactive outside a batch)."""
    return getattr(_local, "cls", INTERACTIVE)


def in_shadow() -> bool:
    """Whether this thread runs a shadow batch (its metrics are not traffic). Called for every
    request's metrics: a module global read while no shadow batch runs anywhere."""
    return _shadow_runs > 0 and getattr(_local, "cls", INTERACTIVE) == SHADOW


@contextlib.contextmanager
def running_as(cls: int) -> Iterator[None]:
    """Mark this (batch) thread as running work of class `cls`."""
    global _shadow_runs
    before = current()
    _local.cls = cls
    if cls == SHADOW:
        with _shadow_lock:
            _shadow_runs += 1
    try:
        yield
    finally:
        _local.cls = before
        if cls == SHADOW:
            with _shadow_lock:
                _shadow_runs -= 1


class Gate:
    """One per worker, on its event loop: counts the jobs of each class that are queued or
    running, and tells a batcher whether a lower-class batch may start now."""

    def __init__(self, max_wait_s: float, chunk_rows: int, shadow_max_wait_s: float):
        self.max_wait_s, self.chunk_rows, self.shadow_max_wait_s = max_wait_s, chunk_rows, shadow_max_wait_s
        self.demand = [0] * len(CLASSES)  # jobs queued or running, per class
        self.waiting = [0] * len(CLASSES)  # jobs queued, not yet in a batch, per class
        self.aged = [0] * len(CLASSES)  # lower-class batches that went ahead after max_wait_s
        self._changed = asyncio.Event()
        self._watched = False  # a batcher waits on _changed (else finishing costs no event)

    def queued(self, cls: int, n: int = 1) -> None:
        self.demand[cls] += n
        self.waiting[cls] += n

    def started(self, cls: int, n: int = 1) -> None:
        """Jobs left the queue for a batch (they count as demand until finished)."""
        self.waiting[cls] -= n

    def finished(self, cls: int, n: int = 1, *, queued: bool = False) -> None:
        """Jobs are done (`queued`: they never left the queue: skipped, shed, dropped)."""
        self.demand[cls] -= n
        if queued:
            self.waiting[cls] -= n
        if self._watched and cls < SHADOW and not any(self.demand[: cls + 1]):
            self._changed.set()  # lower-class batches may go now
            self._changed, self._watched = asyncio.Event(), False

    def spare(self) -> bool:
        """Spare capacity for shadow work: at most SPARE_QUEUE higher-class jobs wait for a batch
        anywhere in the worker (at moderate load a job or two wait while one runs; at saturation
        queues grow well past it)."""
        return self.waiting[INTERACTIVE] + self.waiting[BATCH] <= SPARE_QUEUE

    def blocks(self, cls: int) -> bool:
        return cls > INTERACTIVE and any(self.demand[:cls])

    def changed(self) -> asyncio.Event:
        """Set the next time higher-class demand drops to zero."""
        self._watched = True
        return self._changed

    def snapshot(self) -> dict:
        return {
            c: {"queued_or_running": self.demand[i], "queued": self.waiting[i], "aged_batches": self.aged[i]}
            for i, c in enumerate(CLASSES)
        }


class ShadowBudget:
    """The CPU a worker's shadow work may use: `share` of one core on average, as a token
    bucket of CPU seconds (refilled at `share` per second, holding at most `burst_s`).

    A mirror is admitted while the bucket is not empty and is charged at once what a mirror of
    that model has cost lately (`estimate`); when it has run, the charge is corrected to what
    it really cost (its share of the batch's run, plus any decoding it did). So at low load
    every request can be mirrored, at moderate load a sample is, and however many mirrors are
    in flight they never take more than the budget from clients."""

    def __init__(self, share: float, burst_s: float = 0.02, clock=time.monotonic):
        self.share, self.burst_s, self.clock = share, burst_s, clock
        self.level, self.at = burst_s, clock()
        self.costs: dict[str, float] = {}  # model -> recent cost of one mirror (EWMA, seconds)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst_s, self.level + (now - self.at) * self.share)
        self.at = now

    def admit(self, model: str) -> float | None:
        """The charge for one mirror of `model`, or None: the budget is spent, drop it."""
        self._refill()
        if self.level <= 0:
            return None
        charge = self.costs.get(model, 0.0)
        self.level -= charge
        return charge

    def settle(self, model: str, charged: float, cost: float) -> None:
        """A mirror ran and cost `cost` CPU seconds (it was charged `charged` when admitted)."""
        self.level -= cost - charged
        before = self.costs.get(model)
        self.costs[model] = cost if before is None else 0.8 * before + 0.2 * cost
