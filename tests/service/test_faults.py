"""Start-up refuses unverifiable models; settings change behaviour (API key, limits, batching)."""

import shutil

import httpx
import numpy as np
import pytest

from tests.conftest import EXPORTED, png
from tests.service.conftest import Server


@pytest.mark.parametrize("damage", ["flip a byte", "delete the file"])
def test_a_corrupt_or_missing_model_stops_startup(tmp_path, damage):
    shutil.copytree(EXPORTED, tmp_path / "exported")
    target = tmp_path / "exported" / "denoiser.onnx"
    if damage == "flip a byte":
        blob = bytearray(target.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        target.write_bytes(bytes(blob))
    else:
        target.unlink()
    s = Server(env={"DEEPSERVE_EXPORTED_DIR": str(tmp_path / "exported")}, wait=False)
    try:
        code = s.proc.wait(timeout=90)
    finally:
        s.stop()
    assert code != 0
    log = s.log()
    assert "deepserve cannot start" in log and "denoiser" in log
    assert ("refusing to serve an unverified model" in log) if damage == "flip a byte" else ("is missing" in log)


@pytest.fixture(scope="module")
def strict_server():
    s = Server(env={"DEEPSERVE_API_KEY": "s3cret", "DEEPSERVE_MAX_BODY_BYTES": "20000",
                    "DEEPSERVE_MAX_GENERATE": "4", "DEEPSERVE_BATCHING": "false",
                    "DEEPSERVE_CORS_ORIGINS": "https://app.example"})  # fmt: skip
    yield s
    s.stop()


def test_api_key_is_required_when_configured(strict_server):
    url = strict_server.url
    r = httpx.post(url + "/generate", json={"n": 1})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.post(url + "/generate", json={"n": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url + "/generate", json={"n": 1}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.post(url + "/generate", json={"n": 1}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200  # probes stay open


def test_limits_are_settings(strict_server):
    h = {"X-API-Key": "s3cret"}
    r = httpx.post(strict_server.url + "/generate", json={"n": 5}, headers=h)
    assert r.status_code == 400 and "between 1 and 4" in r.json()["error"]
    big = png(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    r = httpx.post(strict_server.url + "/classify", files={"image": ("b.png", big, "image/png")}, headers=h)
    assert r.status_code == 413 and r.json()["limit"] == 20000


def test_batching_off_is_reported(strict_server):
    body = httpx.get(strict_server.url + "/models", headers={"X-API-Key": "s3cret"}).json()
    assert body["batching"]["enabled"] is False


def test_cors_is_off_by_default_and_on_for_configured_origins(strict_server, client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/classify", headers=preflight).headers
    r = httpx.options(strict_server.url + "/classify", headers=preflight)
    assert r.headers.get("access-control-allow-origin") == "https://app.example"
    r = httpx.options(strict_server.url + "/classify", headers={**preflight, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_a_request_over_the_timeout_gets_a_504_not_a_hang():
    s = Server(env={"DEEPSERVE_REQUEST_TIMEOUT_S": "0.001"})
    try:
        r = httpx.post(s.url + "/generate", json={"n": 64, "seed": 1}, timeout=10)
        assert r.status_code == 504 and "did not finish within 0.001 s" in r.json()["error"]
        assert httpx.get(s.url + "/readyz").status_code == 200  # and the server is fine
    finally:
        s.stop()
