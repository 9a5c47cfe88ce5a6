"""Settings change what clients see: API key, limits, batching, CORS, the request timeout."""

import asyncio
import time
import types

import numpy as np

from service.errors import ApiError
from tests.conftest import png


def test_api_key_is_required_when_configured(make_app):
    c = make_app(api_key="s3cret").client
    r = c.post("/generate", json={"n": 1})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert c.post("/generate", json={"n": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/generate", json={"n": 1}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.post("/generate", json={"n": 1}, headers={"X-API-Key": " s3cret\n"}).status_code == 200  # stripped
    assert c.get("/models").status_code == 401
    assert c.get("/docs.json").status_code == 200 and c.get("/schema.json").status_code == 200  # contracts stay open


def test_api_key_from_a_file_is_stripped(make_app, tmp_path):
    (tmp_path / "key").write_text("  from-file\n")
    c = make_app(api_key_file=tmp_path / "key").client
    assert c.post("/generate", json={"n": 1}, headers={"Authorization": "Bearer from-file"}).status_code == 200
    assert c.post("/generate", json={"n": 1}).status_code == 401


def test_limits_are_settings(make_app):
    c = make_app(max_generate=4, max_body_bytes=20000).client
    r = c.post("/generate", json={"n": 5})
    assert r.status_code == 400 and "between 1 and 4" in r.json()["error"]
    big = png(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    r = c.post("/classify", files={"image": ("b.png", big, "image/png")})
    assert r.status_code == 413 and r.json()["limit"] == 20000


def test_the_openapi_document_follows_the_settings(make_app):
    doc = make_app(max_generate=4, max_images=7, max_texts=3).client.get("/docs.json").json()
    gen = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert gen["n"]["maximum"] == 4
    form = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["image"]["maxItems"] == 7 and form["model"]["enum"] == ["digits", "fashion"]
    text = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert text["texts"]["maxItems"] == 3 and text["model"]["enum"] == ["sentiment"]


def test_batching_off_is_reported(make_app):
    assert make_app(batching=False).client.get("/models").json()["batching"]["enabled"] is False


def test_cors_is_off_by_default_and_on_for_configured_origins(make_app, client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/classify", headers=preflight).headers
    c = make_app(cors_origins="https://app.example").client
    r = c.options("/classify", headers=preflight)
    assert r.headers.get("access-control-allow-origin") == "https://app.example"
    r = c.options("/classify", headers={**preflight, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    r = c.post("/classify", json={"text": "fine"}, headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_a_request_over_the_timeout_gets_a_504_not_a_hang(make_app):
    c = make_app(request_timeout_s=0.001).client
    r = c.post("/generate", json={"n": 64, "seed": 1})
    assert r.status_code == 504 and "did not finish within 0.001 s" in r.json()["error"]


def test_the_slot_wait_ends_a_shed_hold_after_arrival_not_after_the_body(make_app):
    """At capacity a request waits for a slot until DEEPSERVE_SHED_HOLD_MS after it *arrived*:
    one whose body took longer than the hold is answered 503 at once, not a second hold later
    (a wait counted from the body's arrival added the body's time to every such 503); one that
    arrives now waits the whole hold; a slot freed within the hold goes to the waiter."""
    ip = make_app(max_concurrency=1, shed_hold_ms=1000)
    app = ip.app

    async def ask(arrived_ago: float, free_after: float | None = None):
        req = types.SimpleNamespace(start=time.perf_counter() - arrived_ago)
        if free_after is not None:
            asyncio.get_running_loop().call_later(free_after, app.slots.release)
        started = time.perf_counter()
        try:
            async with app.work(req):
                return "slot", time.perf_counter() - started
        except ApiError as exc:
            return exc.status, time.perf_counter() - started

    assert ip.client.portal.call(app.slots.acquire, 0)  # the one slot is busy
    status, waited = ip.client.portal.call(ask, 1.5)  # its body took 1.5 s to arrive
    assert status == 503 and waited < 0.5, waited  # before: 1.0 s more
    status, waited = ip.client.portal.call(ask, 0.0)
    assert status == 503 and waited >= 0.99, waited  # the whole hold
    status, waited = ip.client.portal.call(ask, 0.0, 0.2)
    assert status == "slot" and waited < 0.99, waited  # the freed slot went to the waiter
    assert app.slots.taken == 0 and not app.slots.waiters
