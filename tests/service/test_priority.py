"""Priority classes on the real server: a heavy client marked `X-Priority: batch` stays off
other clients' latency (measured against the same heavy client at the default class, in the
same test, interleaved), its own requests still progress (no starvation; anything shed is
an explicit 503), and a bad
class is a 400 that names the header."""

from __future__ import annotations

import re
import statistics
import threading
import time

import httpx
import pytest

from bench.harness import wrk
from tests.conftest import FIXTURES, require_tools

# timing: make test-noisy runs these beside a busy core; heavy: they bound latency under the
# load they make themselves (both cores): under make test's two workers no timing or heavy test runs beside
pytestmark = [pytest.mark.timing, pytest.mark.heavy]

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()


@pytest.fixture(scope="module")
def bodies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("priority")
    f = tmp / "classify.body"
    f.write_bytes(
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="7.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + SEVEN + b"\r\n--B--\r\n"
    )
    g = tmp / "generate.json"
    g.write_text('{"n": 64}')
    return ("/classify", "multipart/form-data; boundary=B", f, ""), g


def test_a_bad_priority_class_is_a_400_naming_the_header(client):
    for value in ("shadow", "urgent", "1"):
        r = client.post("/generate", json={"n": 1}, headers={"X-Priority": value})
        assert r.status_code == 400 and "X-Priority" in r.json()["error"], r.text
    for value in ("batch", "BATCH", "interactive"):
        r = client.post("/generate", json={"n": 1, "seed": 3}, headers={"X-Priority": value})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.alone  # a comparison of latencies: a neighbour's CPU use (a test starting servers) confounded it
def test_a_heavy_batch_client_stays_off_the_bystanders_and_still_progresses(server, bodies):
    require_tools("wrk")
    classify, generate = bodies
    p95 = {"interactive": [], "batch": []}
    heavy_ok = {"interactive": [], "batch": []}
    errors_5xx = lambda: sum(  # /generate's server errors other than a 503 shed
        float(v)
        for code, v in re.findall(
            r'deepserve_http_requests_total\{code="(5\d\d)",endpoint="/generate"\} (\S+)',
            httpx.get(server.url + "/metrics").text,
        )
        if code != "503"
    )
    before = errors_5xx()
    for cls in ("interactive", "batch", "batch", "interactive"):  # ABBA: drift cancels
        heavy = ("/generate", "application/json", generate, "" if cls == "interactive" else "X-Priority: batch")
        alone = wrk(server.url, classify, 2, 1)  # this round's floor
        out = {}
        t = threading.Thread(target=lambda h=heavy, o=out: o.update(heavy=wrk(server.url, h, 48, 4)))
        t.start()
        time.sleep(1.0)  # the heavy client is at full load
        out["bystanders"] = wrk(server.url, classify, 2, 3)
        t.join()
        assert out["bystanders"]["errors"] == 0 and alone["errors"] == 0, (alone, out)
        p95[cls].append((out["bystanders"]["p95_ms"], alone["p95_ms"]))
        heavy_ok[cls].append((out["heavy"]["requests"], out["heavy"]["errors"], out["heavy"]["socket_errors"]))
    # what the heavy client adds to the bystanders' p95 over the same round's floor: a neighbour
    # on the other core (another test, a CI job) raises the floor of both classes alike and
    # hid the effect in a ratio of totals (p95 57 -> 35 ms beside a busy worker, against a bound of 0.5)
    harm = {cls: statistics.median(with_ - floor for with_, floor in rounds) for cls, rounds in p95.items()}
    assert harm["batch"] < 0.5 * harm["interactive"], (harm, p95)  # bench/priority.py: p99 39 ms -> 7 ms
    # the batch class progressed; on a busy machine some of it may be shed, but only explicitly
    # (503 with Retry-After), never a timeout, a broken connection or another server error
    for requests, errors, unanswered in heavy_ok["batch"]:
        assert requests - errors > 20 and unanswered == 0, heavy_ok
    assert errors_5xx() == before, heavy_ok
    metrics = httpx.get(server.url + "/metrics").text
    assert 'deepserve_priority_wait_seconds_count{class="batch"}' in metrics
