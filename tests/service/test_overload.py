"""Overload: far past saturation deepserve sheds quickly with 503 + Retry-After instead of
queueing without bound, answers nothing else in the 5xx range, keeps its memory bounded and is
ready again as soon as the load stops.

`make test` runs it for 10 s; `make stress` for a minute (DEEPSERVE_STRESS_SECONDS=60), at
DEEPSERVE_STRESS_CONCURRENCY (default 256: 8× the 32 clients of the benchmark target)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import FIXTURES
from tests.service.conftest import Server

# timing: make test-noisy runs these beside a busy core; heavy: they bound latency under the
# load they make themselves (both cores): under make test's two workers no timing or heavy test runs beside
pytestmark = [pytest.mark.timing, pytest.mark.heavy]

SECONDS = float(os.environ.get("DEEPSERVE_STRESS_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("DEEPSERVE_STRESS_CONCURRENCY", "256"))
SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()
HOLD_MS = 200


async def flood(url: str, seconds: float, concurrency: int) -> tuple[collections.Counter, dict, bool]:
    """`concurrency` clients sending back to back for `seconds`; status counts, latencies by
    status, and whether every 503 carried Retry-After."""
    counts, latencies, retry_after = collections.Counter(), collections.defaultdict(list), True
    deadline = time.monotonic() + seconds
    # close idle connections before the server's 5 s keep-alive timeout does, so no request
    # races a server-side close (a client-side artefact, not a dropped request)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client(i: int) -> None:
            nonlocal retry_after
            while time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    if i % 2:
                        r = await client.post("/generate", json={"n": 16, "seed": i, "format": "json"})
                    else:
                        r = await client.post("/classify", files={"image": ("7.png", SEVEN, "image/png")})
                except httpx.HTTPError as exc:
                    counts[type(exc).__name__] += 1
                    continue
                counts[r.status_code] += 1
                latencies[r.status_code].append(time.monotonic() - start)
                if r.status_code == 503:
                    retry_after &= "retry-after" in r.headers
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    return counts, latencies, retry_after


def server_side_p95(metrics: str, code: str) -> float:
    """p95 of deepserve's request duration for one status code, from /metrics (upper bucket bound)."""
    buckets = collections.Counter()
    for line in metrics.splitlines():
        if line.startswith("deepserve_http_request_duration_seconds_bucket") and f'code="{code}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets[float(le)] += float(line.rsplit(" ", 1)[1])
    total = buckets[float("inf")]
    return next(le for le in sorted(buckets) if buckets[le] >= 0.95 * total) if total else 0.0


def tree_rss(pid: int) -> int:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def test_overload_sheds_fast_stays_bounded_and_recovers():
    # 32 slots (and as many waiting) for 256 clients: past that, requests are shed
    server = Server(env={"DEEPSERVE_MAX_CONCURRENCY": "32", "DEEPSERVE_SHED_HOLD_MS": str(HOLD_MS)})
    peak, stop = [tree_rss(server.proc.pid)], threading.Event()

    def watch_memory():
        while not stop.is_set():
            peak.append(tree_rss(server.proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    try:
        counts, latencies, retry_after = asyncio.run(flood(server.url, SECONDS, CONCURRENCY))
        scraped = httpx.get(server.url + "/metrics").text
        shed_p95, served_p95 = server_side_p95(scraped, "503"), server_side_p95(scraped, "200")
        stop.set()
        watcher.join()
        recovered_at = time.monotonic()
        while httpx.get(server.url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() - recovered_at < 10, "not ready 10 s after the load stopped"
            time.sleep(0.1)
        r = httpx.post(server.url + "/classify", files={"image": ("7.png", SEVEN, "image/png")}, timeout=10)
        assert r.status_code == 200 and r.json()["label"] == "7"
    finally:
        stop.set()
        server.stop()
    total = sum(counts.values())
    p99 = {code: round(float(np.percentile(v, 99)), 3) for code, v in latencies.items()}
    print(
        f"\noverload {CONCURRENCY} clients x {SECONDS:.0f} s: {dict(counts)}; p99 s {p99}; "
        f"peak RSS {max(peak) / 2**20:.0f} MiB (idle {peak[0] / 2**20:.0f} MiB); "
        f"server-side p95: 503 <= {shed_p95} s, 200 <= {served_p95} s"
    )
    assert counts[200] > 0 and counts[503] > 0, counts  # it served, and it shed
    bad = {k: v for k, v in counts.items() if k not in (200, 503)}
    assert not bad, f"answers other than 200/503 under overload: {bad}"
    assert retry_after, "a 503 without Retry-After"
    # server-side: the client's own latency on this 2-core machine includes its event loop and
    # the accept queue, shared with the server (printed above, recorded in docs/operations.md)
    # a 503 is held HOLD_MS (so resending clients cannot spin), and costs nothing else
    # (+0.3 s on a quiet machine; on a busy one, no slower than what it serves, and never 1 s)
    bound = min(1.0, max(HOLD_MS / 1000 + 0.3, served_p95))
    assert shed_p95 <= bound, f"shedding is not fast: p95 {shed_p95} s inside the server (served: {served_p95} s)"
    assert max(peak) < peak[0] + 1.5 * 2**30, "memory grew without bound"
    assert total > 0
