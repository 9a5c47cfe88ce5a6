"""`make bench` end to end in miniature: the no-op and FastAPI peers start, wrk drives every
endpoint, results and the report's target table come out (the real run is `make bench`)."""

import json
import subprocess
import sys

import pytest

from bench.report import targets
from tests.conftest import REPO, require_tools


@pytest.mark.heavy  # peers, wrk and the in-process runs: both cores
@require_tools("wrk")
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--seconds",
        "1",
        "--concurrency",
        "2",
        "--only",
        "noop",
        "fastapi",
        "--no-docs",
        "--in-process-seconds",
        "0.02",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(out.read_text())
    for kind in ("noop", "fastapi"):
        for ep in ("classify-image", "classify-text", "generate-16", "denoise"):
            point = results["servers"][kind][ep]["2"]
            assert point["requests"] > 0 and point["errors"] == 0, (kind, ep, point)
    assert results["in_process"]["classify-image"]["rows_per_s"] > 0


def test_targets_compare_deepserve_with_the_best_peer():
    point = lambda rps: {"rps": rps, "errors": 0, "p99_ms": 10.0}
    results = {
        "servers": {
            "deepserve": {"classify-image": {"32": point(900)}},
            "fastapi": {"classify-image": {"32": point(1000)}},
            "litserve": {"classify-image": {"32": point(500)}},
            "noop": {"classify-image": {"32": point(1500)}},
        }
    }
    rows = {name: ok for name, _, ok in targets(results)}
    assert rows["/classify (image): deepserve ≥ best peer at c=32"] is False
    assert rows["/classify (image) ≥ 50% of the no-op upload server"] is True
    assert rows["/classify (image): p99 ≤ 100 ms at c=32"] is True
