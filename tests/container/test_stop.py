"""`docker stop` under load (SIGTERM to PID 1, then SIGKILL after the timeout): PID 1 is
`bentoml serve` (BentoML's entrypoint execs it), which drains: every accepted request is
answered, /readyz turns 503, and the container exits 0 well before the timeout."""

from __future__ import annotations

import collections
import threading
import time

import httpx
import pytest

from tests.container.conftest import docker, production, seeded_models
from tests.service.test_lifecycle import hammer

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core


def test_docker_stop_under_load_loses_no_accepted_request(image, tmp_path):
    c = production(image, seeded_models(image, tmp_path / "models"))
    try:
        c.wait_ready()
        assert c.exec("cat", "/proc/1/cmdline").stdout.split("\0")[1:3] == ["/app/.venv/bin/bentoml", "serve"]
        outcomes, stop = collections.Counter(), threading.Event()
        clients = [threading.Thread(target=hammer, args=(c.url, outcomes, stop)) for _ in range(8)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while outcomes[200] < 10:  # under load when the signal comes
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.1)
        before = outcomes[200]
        stopping = threading.Thread(target=docker, args=("stop", "-t", "60", c.name), kwargs={"timeout": 90})
        started = time.monotonic()
        stopping.start()
        ready = []
        while len(ready) < 20 and 503 not in ready and time.monotonic() - started < 10:
            try:
                ready.append(httpx.get(c.url + "/readyz", timeout=5).status_code)
            except httpx.HTTPError as exc:
                ready.append(type(exc).__name__)
        time.sleep(1.0)  # a load balancer's moment to see /readyz fail
        stop.set()
        for t in clients:
            t.join(60)
        stopping.join(90)
        took = time.monotonic() - started
        state, logs = c.state(), c.logs()
    finally:
        stop.set()
        c.remove()
    assert 503 in ready, ready  # draining: not ready for new traffic
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state  # exited by itself, not SIGKILLed at 60 s
    assert took < 60, took
    dropped = {k: v for k, v in outcomes.items() if k not in (200, 503, "refused")}
    assert not dropped, f"requests lost during docker stop: {dropped} (all: {dict(outcomes)})"
    assert outcomes[200] > before, outcomes  # it kept serving while draining
    assert "drained in" in logs, logs[-2000:]
