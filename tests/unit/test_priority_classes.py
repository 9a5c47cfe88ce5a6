"""Priority classes in the batcher and the worker's gate (service.priority): batches hold one
class and the highest goes first, lower-class work waits while higher-class work exists
anywhere in the worker, overload sheds the lowest class first, batch work never starves, and
shadow work is dropped rather than queued."""

import asyncio
import concurrent.futures
import threading
import time

import pytest

from service import priority
from service.batching import Batcher, Overloaded


def _batcher(fn, gate, name="m", **kw):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return Batcher(name, fn, executor=pool, gate=gate, **{"max_batch_size": 64, "max_latency_ms": 5000, **kw})


def _gate(max_wait_s=5.0, chunk_rows=4, shadow_max_wait_s=5.0):
    return priority.Gate(max_wait_s, chunk_rows, shadow_max_wait_s)


async def _until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def test_batches_hold_one_class_the_highest_first_and_lower_classes_in_chunks():
    release, batches = threading.Event(), []

    def fn(items):
        if items == ["block"]:
            release.wait(5)
        batches.append(list(items))
        return items

    async def main():
        gate = _gate(chunk_rows=2)
        b = _batcher(fn, gate)
        first = asyncio.ensure_future(b.submit("block", 1))
        await _until(lambda: b.running_until > 0)
        lower = [asyncio.ensure_future(b.submit(f"b{i}", 1, cls=priority.BATCH)) for i in range(5)]
        await asyncio.sleep(0.01)
        upper = [asyncio.ensure_future(b.submit(f"i{i}", 1)) for i in range(3)]
        await _until(lambda: len(b.queue) == 8)
        release.set()
        await asyncio.gather(first, *lower, *upper)
        b.shutdown()

    asyncio.run(main())
    assert batches[0] == ["block"]
    assert batches[1] == ["i0", "i1", "i2"]  # arrived last, went first
    assert batches[2:] == [["b0", "b1"], ["b2", "b3"], ["b4"]]  # chunk_rows rows at a time


def test_lower_class_work_waits_for_interactive_work_in_another_model():
    release, started = threading.Event(), {}

    def busy(items):
        release.wait(5)
        return items

    def other(items):
        started.setdefault("batch", time.monotonic())
        return items

    async def main():
        gate = _gate(max_wait_s=10.0)
        a, b = _batcher(busy, gate, "a"), _batcher(other, gate, "b")
        job = asyncio.ensure_future(a.submit("interactive", 1))
        await _until(lambda: a.running_until > 0)
        background = asyncio.ensure_future(b.submit("batch", 1, cls=priority.BATCH))
        await asyncio.sleep(0.3)
        assert "batch" not in started  # held at the gate while model a runs interactive work
        released = time.monotonic()
        release.set()
        await asyncio.gather(job, background)
        a.shutdown(), b.shutdown()
        return released

    released = asyncio.run(main())
    assert started["batch"] >= released


def test_batch_work_never_starves_under_endless_interactive_work():
    stop = threading.Event()

    def endless(items):  # interactive work that never ends while the batch work waits
        stop.wait(10)
        return items

    async def main():
        gate = _gate(max_wait_s=0.05)
        a, b = _batcher(endless, gate, "a"), _batcher(lambda items: items, gate, "b")
        interactive = asyncio.ensure_future(a.submit("i", 1))
        await _until(lambda: a.running_until > 0)
        start = time.monotonic()
        done = await asyncio.gather(*(b.submit(f"b{i}", 1, cls=priority.BATCH) for i in range(3)))
        took = time.monotonic() - start
        still_busy = gate.demand[priority.INTERACTIVE] > 0
        stop.set()
        await interactive
        a.shutdown(), b.shutdown()
        return done, took, still_busy, gate.aged[priority.BATCH]

    done, took, still_busy, aged = asyncio.run(main())
    assert done == ["b0", "b1", "b2"] and still_busy
    assert aged >= 1  # they went ahead of interactive work that never stopped
    assert took < 3.0  # bounded by max_wait per batch (0.05 s), not by the interactive load


def test_overload_sheds_queued_lower_class_work_first():
    release = threading.Event()

    def fn(items):
        release.wait(5)
        return items

    async def main():
        b = _batcher(fn, _gate(), max_latency_ms=100, max_batch_size=1)
        for _ in range(5):
            b.cost.observe(1, 0.04)  # 40 ms per request
        running = asyncio.ensure_future(b.submit("running", 1))
        await _until(lambda: b.running_until > 0)
        b.running_until = time.monotonic()  # the running batch is predicted to end now
        lower = [asyncio.ensure_future(b.submit(f"b{i}", 1, cls=priority.BATCH)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # a third would wait 120 ms > 100 ms: its own class sheds it
            b.admit(1, cls=priority.BATCH)
        upper = [asyncio.ensure_future(b.submit(f"i{i}", 1)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # no lower class left to shed: the interactive request itself
            b.admit(1)
        release.set()
        results = await asyncio.gather(running, *lower, *upper, return_exceptions=True)
        b.shutdown()
        return results

    results = asyncio.run(main())
    assert results[0] == "running" and results[3:] == ["i0", "i1"]
    assert all(isinstance(r, Overloaded) and "higher-priority" in str(r) for r in results[1:3])


def test_shadow_work_runs_only_in_spare_capacity_and_is_dropped_when_late():
    release = threading.Event()

    def fn(items):
        release.wait(5)
        return items

    async def main():
        gate = _gate(shadow_max_wait_s=0.1)
        a, b = _batcher(fn, gate, "a"), _batcher(lambda items: items, gate, "b")
        assert await b.submit("idle", 1, cls=priority.SHADOW) == "idle"  # nothing else: it runs
        first = asyncio.ensure_future(a.submit("x", 1))
        await _until(lambda: a.running_until > 0)
        queued = [asyncio.ensure_future(a.submit(f"y{i}", 1)) for i in range(priority.SPARE_QUEUE)]
        await asyncio.sleep(0)
        b.admit(1, cls=priority.SHADOW)  # a job or two waiting: still spare (moderate load)
        queued.append(asyncio.ensure_future(a.submit("one too many", 1)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # queues growing: dropped at the door, never queued
            b.admit(1, cls=priority.SHADOW)
        release.set()
        await asyncio.gather(first, *queued)
        # admitted while spare, then held behind interactive work past its wait: dropped
        release.clear()
        blocker = asyncio.ensure_future(a.submit("z", 1))
        await _until(lambda: a.running_until > 0)
        late = await asyncio.gather(b.submit("late", 1, cls=priority.SHADOW), return_exceptions=True)
        release.set()
        await blocker
        a.shutdown(), b.shutdown()
        return late[0]

    late = asyncio.run(main())
    assert isinstance(late, Overloaded) and "waited too long" in str(late)


def test_a_late_job_for_a_closed_version_still_runs():
    async def main():
        b = _batcher(lambda items: [x + 1 for x in items], _gate())
        assert await b.submit(1, 1) == 2
        b.shutdown()  # the version was closed while a request was still decoding
        out = await b.submit(41, 1)
        b.shutdown()
        return out

    assert asyncio.run(main()) == 42


def test_the_gate_counts_every_job_back_to_zero():
    async def main():
        gate = _gate()
        b = _batcher(lambda items: items, gate)
        await asyncio.gather(
            *(b.submit(i, 1, cls=c) for i, c in enumerate([0, 1, 2, 0, 1] * 4)), return_exceptions=True
        )
        b.shutdown()
        return gate

    gate = asyncio.run(main())
    assert gate.demand == [0, 0, 0] and gate.waiting == [0, 0, 0]


def test_the_shadow_budget_holds_shadow_cpu_to_its_share_however_many_mirrors_are_in_flight():
    """A 100% shadow is sampled down to the budget: mirrors admitted over a simulated minute
    cost at most `share` of a core (plus one burst), at any offered rate; at a low rate every
    request is mirrored; many mirrors admitted before any has finished are charged up front."""
    from service.priority import ShadowBudget

    cost = 0.001  # one mirror's model run, seconds
    for rate, share in ((50, 0.05), (500, 0.05), (5000, 0.05), (500, 0.2)):
        now = [0.0]
        budget = ShadowBudget(share, burst_s=0.02, clock=lambda now=now: now[0])
        admitted = 0
        for i in range(rate * 60):
            now[0] = i / rate
            charge = budget.admit("digits")
            if charge is not None:
                budget.settle("digits", charge, cost)
                admitted += 1
        used = admitted * cost / 60
        assert used <= share + 0.02 / 60 + cost / 60, (rate, share, used)
        if rate * cost <= share:
            assert admitted == rate * 60, (rate, admitted)  # spare budget: every request mirrored
        else:
            assert used >= 0.9 * share, (rate, share, used)  # and the budget is used, not wasted
    # in flight: once the cost is known, mirrors admitted together are charged it at admission
    now = [0.0]
    budget = ShadowBudget(0.05, burst_s=0.02, clock=lambda: now[0])
    budget.settle("digits", budget.admit("digits"), cost)
    held = []
    while (charge := budget.admit("digits")) is not None:
        held.append(charge)
    assert len(held) <= 0.02 / cost + 1, len(held)


def test_only_the_thread_running_a_shadow_batch_is_in_shadow():
    """Metrics skip a mirrored run's trust observations (in_shadow), on that batch thread only:
    another model's thread running client work meanwhile still counts, and the flag is clear
    again once the shadow batch ends (also when it raised)."""
    from service import metrics

    inside, other = threading.Event(), threading.Event()
    seen = {}

    def shadow_thread():
        with priority.running_as(priority.SHADOW):
            seen["shadow"] = priority.in_shadow()
            inside.set()
            other.wait(5)

    def client_thread():
        inside.wait(5)
        with priority.running_as(priority.BATCH):
            seen["batch"] = priority.in_shadow()
        seen["plain"] = priority.in_shadow()
        metrics.aggregate.inc("ood", ("in-shadow-test", "true"))
        other.set()

    before = metrics.aggregate.counters[("ood", ("in-shadow-test", "true"))]
    threads = [threading.Thread(target=shadow_thread), threading.Thread(target=client_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen == {"shadow": True, "batch": False, "plain": False}
    assert metrics.aggregate.counters[("ood", ("in-shadow-test", "true"))] == before + 1
    with pytest.raises(RuntimeError), priority.running_as(priority.SHADOW):
        metrics.aggregate.inc("ood", ("in-shadow-test", "true"))  # not counted: a mirrored run
        raise RuntimeError("the shadow batch failed")
    assert not priority.in_shadow() and priority._shadow_runs == 0
    assert metrics.aggregate.counters[("ood", ("in-shadow-test", "true"))] == before + 1
