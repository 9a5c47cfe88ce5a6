import asyncio
import concurrent.futures

import numpy as np
import pytest

from service.batching import Batcher, run_rows


def test_run_rows_splits_back_per_request_in_order():
    items = [(np.full((k, 2), k, np.float32),) for k in (1, 3, 2)]
    calls = []

    def fn(x):
        calls.append(len(x))
        return x * 10

    out = run_rows(fn, items, max_rows=4)
    assert [o.shape[0] for o in out] == [1, 3, 2]
    assert [float(o[0, 0]) for o in out] == [10, 30, 20]
    assert calls == [4, 2]  # six rows, at most four per call


def test_run_rows_with_several_columns():
    items = [(np.array([1, 2]), np.array([10, 20])), (np.array([3]), np.array([30]))]
    out = run_rows(lambda a, b: a + b, items, max_rows=8)
    assert [o.tolist() for o in out] == [[11, 22], [33]]


def _batcher(fn, enabled=True):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return Batcher("m", fn, enabled=enabled, max_batch_size=64, max_latency_ms=5000, executor=pool)


def test_concurrent_requests_are_merged_into_batches():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        return [x * 2 for x in items]

    async def main():
        b = _batcher(fn)
        results = await asyncio.gather(*(b.submit(i) for i in range(200)))
        b.shutdown()
        return results

    assert asyncio.run(main()) == [i * 2 for i in range(200)]
    assert max(sizes) > 1 and sum(sizes) == 200


def test_batching_off_runs_each_request_alone():
    sizes = []

    async def main():
        b = _batcher(lambda items: sizes.append(len(items)) or list(items), enabled=False)
        return await asyncio.gather(*(b.submit(i) for i in range(20)))

    assert asyncio.run(main()) == list(range(20))
    assert set(sizes) == {1}


def test_a_result_count_mismatch_fails_the_batch_loudly():
    async def main():
        b = _batcher(lambda items: [], enabled=False)
        await b.submit(1)

    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        asyncio.run(main())
