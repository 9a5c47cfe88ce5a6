"""A short load test in `make test`: locust drives every endpoint of the real server with real
payloads, validates every body, and must meet its thresholds (exit code 0)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from tests.conftest import REPO

# timing: make test-noisy runs these beside a busy core; heavy: they bound latency under the
# load they make themselves (both cores): under make test's two workers no timing or heavy test runs beside
pytestmark = [pytest.mark.timing, pytest.mark.heavy]


def run_locust(url: str, out, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO / "loadtests" / "locustfile.py"),
        "--config",
        str(REPO / "loadtests" / "locust.conf"),
        "--host",
        url,
        "--users",
        "16",
        "--spawn-rate",
        "16",
        "--run-time",
        "15s",
        "--csv",
        str(out / "short"),
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_short_load_test_meets_its_thresholds(server, tmp_path):
    out = run_locust(server.url, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "thresholds met" in out.stderr
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "short_stats.csv"))}
    for name in (
        "/classify digits",
        "/classify fashion",
        "/classify text",
        "/generate n=16",
        "/compress",
        "/decompress",
        "/denoise",
    ):
        assert int(rows[name]["Request Count"]) > 0, f"{name} was never called"
        assert int(rows[name]["Failure Count"]) == 0
    assert int(rows["Aggregated"]["Request Count"]) >= 100


def test_a_broken_threshold_fails_the_run(server, tmp_path):
    out = run_locust(server.url, tmp_path, "--run-time", "4s", "--max-p95-ms", "0.001")
    assert out.returncode == 1
    assert "threshold broken" in out.stderr and "p95" in out.stderr
