"""Adaptive batching for every model path, on BentoML's own batcher.

Each model gets one `CorkDispatcher` (the adaptive batcher behind BentoML's
`@bentoml.api(batchable=True)`): it merges concurrent requests into one call, learns the
call's cost, and sheds a request (503) when it predicts the request would wait past
`max_latency_ms`. Items reach it already validated, so one bad request never fails its
neighbours; the batch function must return exactly one result per item.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher


class Overloaded(Exception):
    """The batcher shed this request: it would have waited longer than max_latency_ms."""


class Batcher:
    def __init__(self, name: str, fn: Callable[[list[Any]], list[Any]], *, enabled: bool,
                 max_batch_size: int, max_latency_ms: int,
                 executor: concurrent.futures.Executor, on_requests: Callable[[str, int], None] | None = None):  # fmt: skip
        self.name, self.fn, self.enabled, self.executor = name, fn, enabled, executor
        self.on_requests = on_requests
        self.dispatcher = CorkDispatcher(
            max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
            fallback=self._shed, get_batch_size=lambda _: 1,
        )  # fmt: skip
        self._call = self.dispatcher(self._run_batch)

    async def submit(self, item: Any) -> Any:
        """One validated item in, its result out (batched with concurrent items)."""
        if not self.enabled:
            (result,) = await self._run_batch((item,))
            return result
        result = await self._call(item)
        if isinstance(result, BaseException):
            raise result
        return result

    async def _run_batch(self, items: Sequence[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_sync, list(items))

    def _run_sync(self, items: list[Any]) -> list[Any]:
        results = self.fn(items)
        if len(results) != len(items):  # the batching contract: one result per request
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} requests")
        if self.on_requests is not None:
            self.on_requests(self.name, len(items))
        return results

    def _shed(self) -> Any:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # our own timeout, not the batcher
            raise asyncio.CancelledError
        raise Overloaded(f"{self.name} is overloaded: the request would wait too long")

    def shutdown(self) -> None:
        self.dispatcher.shutdown()


def run_rows(fn: Callable[..., np.ndarray], items: Sequence[tuple[np.ndarray, ...]], max_rows: int) -> list[np.ndarray]:
    """Items are tuples of row-aligned arrays (one tuple per request). Concatenate them,
    run fn over at most max_rows rows at a time, and split the output back per request."""
    counts = [len(item[0]) for item in items]
    columns = [np.concatenate([item[k] for item in items]) for k in range(len(items[0]))]
    total = sum(counts)
    out = np.concatenate([fn(*(c[i : i + max_rows] for c in columns)) for i in range(0, total, max_rows)])
    return np.split(out, np.cumsum(counts)[:-1])
