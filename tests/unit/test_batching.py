"""The adaptive batcher: merges concurrent jobs, keeps one result per job, sheds what would
be late, and starts no work for a request that was cancelled or whose client is gone."""

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, CostModel, Overloaded
from service.errors import ClientGone
from service.tasks import Job, Task

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core


def _batcher(fn, **kw):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return Batcher("m", fn, executor=pool, **{"max_batch_size": 64, "max_latency_ms": 5000, **kw})


def test_concurrent_requests_are_merged_into_batches():
    sizes = []

    def fn(items):
        time.sleep(0.002)
        sizes.append(len(items))
        return [x * 2 for x in items]

    async def main():
        b = _batcher(fn)
        results = await asyncio.gather(*(b.submit(i, 1) for i in range(200)))
        b.shutdown()
        return results

    assert asyncio.run(main()) == [i * 2 for i in range(200)]
    assert max(sizes) > 1 and sum(sizes) == 200 and max(sizes) <= 64


def test_a_batch_stops_at_max_batch_rows_and_a_bigger_request_runs_alone():
    batches = []

    def fn(items):
        time.sleep(0.002)
        batches.append(list(items))
        return items

    rows = [64] * 40 + [700] + [3] * 50  # requests of 64 rows, one of 700, small ones

    async def main():
        b = _batcher(fn, max_batch_rows=512)
        out = await asyncio.gather(*(b.submit(r, r) for r in rows))
        b.shutdown()
        return out

    assert asyncio.run(main()) == rows
    assert [700] in batches  # a request over the cap is not split across batches nor merged
    for batch in batches:
        assert len(batch) == 1 or sum(batch) <= 512, batch
    assert max(len(b) for b in batches) > 8  # the small requests were still merged


def test_batching_off_runs_each_request_alone():
    sizes = []

    async def main():
        b = _batcher(lambda items: sizes.append(len(items)) or list(items), enabled=False)
        return await asyncio.gather(*(b.submit(i, 1) for i in range(20)))

    assert asyncio.run(main()) == list(range(20))
    assert set(sizes) == {1}


def test_a_result_count_mismatch_fails_the_batch_loudly():
    async def main():
        await _batcher(lambda items: []).submit(1, 1)

    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        asyncio.run(main())


async def _until(condition, timeout: float = 5.0) -> None:
    """Poll the event loop until `condition()` holds: synchronisation without fixed sleeps."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def test_sheds_when_the_predicted_wait_is_over_the_latency_limit():
    started, release = threading.Event(), threading.Event()

    def slow(items):
        started.set()
        release.wait(5)
        return list(items)

    async def main():
        b = _batcher(slow, max_latency_ms=1200, max_batch_size=1)
        b.cost.observe(1, 0.05)  # it has learnt that a row costs 50 ms
        first = asyncio.ensure_future(b.submit(0, 1))
        await _until(started.is_set)  # the batch thread is running request 0 (at most 50 ms left)
        queued = [asyncio.ensure_future(b.submit(i, 10)) for i in (1, 2)]  # 0.5 s each: they fit
        await _until(lambda: len(b.queue) == 2)
        # with 10 more rows: 1.5 s of queued work > 1.2 s whatever is left of the running batch
        # (the margins are whole batches, so the verdict does not depend on this machine's speed)
        with pytest.raises(Overloaded):
            await b.submit(9, 10)
        release.set()
        return await asyncio.gather(first, *queued)

    assert asyncio.run(main()) == [0, 1, 2]


def test_no_work_starts_for_cancelled_or_abandoned_requests():
    seen, release = [], threading.Event()

    def fn(items):
        release.wait(5)
        seen.extend(items)
        return list(items)

    async def main():
        b = _batcher(fn, max_batch_size=8)
        first = asyncio.ensure_future(b.submit("busy", 1))
        await _until(lambda: b.running_until > 0)  # the batch thread is now busy with "busy"
        gone = asyncio.ensure_future(b.submit("timed out", 1))
        hung_up = asyncio.ensure_future(b.submit("client gone", 1, alive=lambda: False))
        kept = asyncio.ensure_future(b.submit("kept", 1))
        await _until(lambda: len(b.queue) == 3)
        gone.cancel()
        release.set()
        await asyncio.gather(first, kept)
        with pytest.raises(ClientGone):
            await hung_up

    asyncio.run(main())
    assert seen == ["busy", "kept"]


def test_cost_model_learns_fixed_and_per_row_cost():
    cm = CostModel()
    for rows in (1, 4, 16, 64, 2, 32) * 5:
        cm.observe(rows, 0.001 + 0.0002 * rows)
    assert cm.fixed == pytest.approx(0.001, rel=0.05) and cm.per_row == pytest.approx(0.0002, rel=0.05)


class _Rows(Task):
    name = "test"


def test_forward_concatenates_jobs_and_splits_outputs_back_in_order(tmp_path):
    """Through a real (tiny) ONNX model: out = 10 * x, dynamic batch; at most max_rows per run."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "ten"], ["out"])],
        "times_ten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])],
    )
    path = tmp_path / "times_ten.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    calls = []

    class Counted:  # what Task.forward uses of service.runtime.Model, over a real session
        output_names = ["out"]

        def run(self, **feeds):
            calls.append(len(feeds["x"]))
            return session.run(self.output_names, feeds)

    jobs = [Job({"x": np.full((k, 2), k, np.float32)}, k) for k in (1, 3, 2)]
    outs = _Rows().forward(Counted(), jobs, max_rows=4)
    assert [o["out"].shape[0] for o in outs] == [1, 3, 2]
    assert [float(o["out"][0, 0]) for o in outs] == [10, 30, 20]
    assert calls == [4, 2]  # six rows, at most four per ONNX run


def test_slots_pass_first_come_first_served_and_give_up_after_the_hold():
    from service.app import Slots

    async def main():
        slots = Slots(2)
        assert await slots.acquire(0.1) and await slots.acquire(0.1)
        order = []

        async def wait(name, timeout):
            order.append((name, await slots.acquire(timeout)))

        first = asyncio.ensure_future(wait("first", 1.0))
        second = asyncio.ensure_future(wait("second", 1.0))
        late = asyncio.ensure_future(wait("gives up", 0.05))
        await asyncio.sleep(0.1)
        cancelled = asyncio.ensure_future(slots.acquire(5.0))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # a request that timed out while waiting leaves no slot behind
        slots.release()
        slots.release()
        await asyncio.gather(first, second, late)
        assert order == [("gives up", False), ("first", True), ("second", True)]
        assert slots.taken == 2 and not slots.waiters
        slots.release()
        slots.release()
        assert slots.taken == 0

    asyncio.run(main())
