"""Two replicas behind a real load balancer (HAProxy, deploy/haproxy/haproxy.cfg): when
every process of one replica is SIGKILLed under load, the requests that were in flight on it
are retried on the other one: no client sees an error status, and only an answer the crash
cut after its first bytes had left reaches its client as a broken connection."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import FIXTURES, REPO, require_tools
from tests.service.conftest import Server, free_port

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()
pytestmark = [pytest.mark.timing, require_tools("haproxy")]  # timing: make test-noisy


def kill_replica(server: Server) -> None:
    """SIGKILL the supervisor and every worker at once: a crashed node, not a shutdown."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def test_a_replica_killed_under_load_loses_no_request(tmp_path):
    a, b = Server(), Server()
    port = free_port()
    env = {
        **os.environ,
        "DEEPSERVE_LB_BIND": f"127.0.0.1:{port}",
        "DEEPSERVE_REPLICA_A": f"127.0.0.1:{a.port}",
        "DEEPSERVE_REPLICA_B": f"127.0.0.1:{b.port}",
    }
    lb = subprocess.Popen(
        ["haproxy", "-f", str(REPO / "deploy" / "haproxy" / "haproxy.cfg"), "-db"],
        env=env,
        stdout=open(tmp_path / "haproxy.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    outcomes, stop = collections.Counter(), threading.Event()
    cuts: list[float] = []  # when each request that ended in a broken connection was sent

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(url + "/classify", files={"image": ("7.png", SEVEN, "image/png")})
                    outcomes[r.status_code if r.status_code != 200 or r.json()["label"] == "7" else "wrong"] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                    cuts.append(sent)

    try:
        deadline = time.monotonic() + 30
        while True:  # both replicas healthy behind the balancer
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.2)
        time.sleep(1.5)
        clients = [threading.Thread(target=client) for _ in range(16)]
        for t in clients:
            t.start()
        time.sleep(4)
        served_by_b = httpx.get(b.url + "/metrics").text.count(
            'deepserve_http_requests_total{code="200",endpoint="/classify"}'
        )
        before = outcomes[200]
        kill_replica(b)
        killed = time.monotonic()  # every process of b is dead by now
        time.sleep(6)
        stop.set()
        for t in clients:
            t.join(60)
    finally:
        stop.set()
        lb.terminate()
        lb.wait(10)
        a.stop()
        b.stop()
    assert served_by_b, "replica b never served: the crash proved nothing"
    assert before > 100 and outcomes[200] > before + 100, outcomes
    # HAProxy sends again every request b had not begun to answer. What no proxy can replay is
    # an answer the crash cut after its first bytes had left (uvicorn writes the head and the
    # body apart; the kernel resets a killed process's sockets): its client sees a broken
    # connection, never a silent loss or a 5xx. So: no status but 200, and every broken
    # connection belongs to a request sent before b was dead (1 in 4,067 in one run of ~20).
    cut = {"RemoteProtocolError", "ReadError"}
    assert set(outcomes) <= {200, *cut}, f"requests lost when a replica crashed: {dict(outcomes)}"
    assert all(sent < killed for sent in cuts), ([round(sent - killed, 3) for sent in cuts], dict(outcomes))
