"""Configuration that cannot work stops start-up with one clear line, and a worker that keeps
dying while starting stops the server: never a port that accepts and never answers."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.service.conftest import Server, free_port


def start_fails(env: dict[str, str], timeout: float = 60) -> str:
    """`bentoml serve` with `env`: it must exit non-zero on its own; its output."""
    import os

    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service.service:DeepServe", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "env, says",
    [
        (  # zipkin's exporter is not installed (BentoML's tracing-zipkin extra; otlp's is)
            {
                "BENTOML_CONFIG_OPTIONS": "services.deepserve.tracing.exporter_type=zipkin "
                "services.deepserve.tracing.zipkin.endpoint=http://127.0.0.1:9411/api/v2/spans"
            },
            "opentelemetry.exporter.zipkin.json",
        ),
        ({"BENTOML_CONFIG_OPTIONS": "services.deepserve.tracing.exporter_type=otlp"}, "protocol"),
        ({"BENTOML_CONFIG_OPTIONS": "services.deepserve.tracing.exporter_type=nonsense"}, "exporter_type"),
        ({"DEEPSERVE_API_KEY_FILE": "/nonexistent/key"}, "api_key_file /nonexistent/key"),
        ({"DEEPSERVE_EXPORTED_DIR": "/nonexistent"}, "has no manifest.json"),
        ({"DEEPSERVE_DEVICE": "cuda"}, "DEEPSERVE_DEVICE=cuda"),
    ],
    ids=["exporter-package-missing", "otlp-no-protocol", "unknown-exporter", "key-file", "model-dir", "cuda"],
)
def test_configuration_that_cannot_work_stops_start_up_with_one_line(env, says):
    out = start_fails(env)
    lines = [line for line in out.splitlines() if line.startswith("deepserve cannot start")]
    assert len(lines) == 1 and says in lines[0], out[-2000:]


def test_a_worker_that_keeps_failing_to_start_stops_the_server():
    """BentoML would respawn it forever with the port open; the start guard stops the server
    after DEEPSERVE_MAX_WORKER_STARTS failed starts in a row, with one clear line."""
    s = Server(target="tests.fixtures.crashing_service:DeepServe", env={"DEEPSERVE_MAX_WORKER_STARTS": "2"}, wait=False)
    try:
        deadline = time.monotonic() + 90
        while s.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after 90 s:\n{s.log()[-3000:]}"
            time.sleep(0.5)
        assert "workers failed to start 2 times in a row" in s.log(), s.log()[-3000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/readyz", timeout=2)
    finally:
        s.stop()
