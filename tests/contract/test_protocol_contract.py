"""The Open Inference Protocol's edge cases, request ids and Server-Timing, in-process."""

from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest

from tests.conftest import active_meta


def infer(client, name: str, inputs: list[dict], binary: bytes = b"", **extra):
    body = json.dumps({"inputs": inputs, **extra}).encode()
    headers = {"Inference-Header-Content-Length": str(len(body))} if binary else {}
    return client.post(
        f"/v2/models/{name}/infer", content=body + binary, headers={"Content-Type": "text/plain", **headers}
    )


def digit_tensor(n: int = 2, **kw) -> dict:
    return {"name": "image", "datatype": "FP32", "shape": [n, 1, 28, 28], "data": [0.0] * (n * 784), **kw}


def split(r) -> tuple[dict, bytes]:
    n = int(r.headers.get("inference-header-content-length", len(r.content)))
    return json.loads(r.content[:n]), r.content[n:]


def test_json_tensors_in_and_out_with_id_echoed_and_any_content_type(client):
    r = infer(client, "digits", [digit_tensor()], id="req-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "digits"
    assert body["model_version"] == active_meta("digits")["version"]
    (logits,) = [o for o in body["outputs"] if o["name"] == "logits"]
    assert logits["datatype"] == "FP32" and logits["shape"] == [2, 10] and len(logits["data"]) == 20


def test_binary_tensors_in_and_out(client):
    x = np.zeros((3, 1, 28, 28), np.float32)
    tensor = {
        "name": "image",
        "datatype": "FP32",
        "shape": [3, 1, 28, 28],
        "parameters": {"binary_data_size": x.nbytes},
    }
    r = infer(client, "digits", [tensor], x.tobytes(), parameters={"binary_data_output": True})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    head, blob = split(r)
    (logits,) = [o for o in head["outputs"] if o["name"] == "logits"]
    assert logits["parameters"]["binary_data_size"] == 3 * 10 * 4
    json_run = infer(client, "digits", [digit_tensor(3)]).json()["outputs"][0]["data"]
    np.testing.assert_allclose(np.frombuffer(blob[: 3 * 10 * 4], np.float32), json_run, rtol=1e-6)


def test_requested_outputs_are_honoured_and_mixed_encodings_work(client):
    r = infer(
        client,
        "sentiment_text",
        [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["great", "bad"]}],
        outputs=[{"name": "label", "parameters": {"binary_data": True}}],
    )
    head, blob = split(r)
    assert [o["name"] for o in head["outputs"]] == ["label"]
    labels, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from("<I", blob, pos)
        labels.append(blob[pos + 4 : pos + 4 + n].decode())
        pos += 4 + n
    assert labels == ["positive", "negative"]


def test_bytes_inputs_as_binary_length_prefixed(client):
    texts = [b"a moving, funny film", b"a tedious mess"]
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    tensor = {"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
    r = infer(client, "sentiment_text", [tensor], raw)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["label"]["data"] == ["positive", "negative"] and out["probabilities"]["shape"] == [2, 2]


def test_token_ids_through_the_raw_sentiment_model(client):
    tokens = {"name": "tokens", "datatype": "INT64", "shape": [2, 3], "data": [[5, 6, 7], [8, 0, 0]]}
    lengths = {"name": "lengths", "datatype": "INT64", "shape": [2], "data": [3, 1]}
    r = infer(client, "sentiment", [tokens, lengths])
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 2]
    bad = infer(client, "sentiment", [tokens, {**lengths, "data": [3, 9]}])
    assert bad.status_code == 400 and "lengths" in bad.json()["error"]


@pytest.mark.parametrize(
    "inputs, binary, extra, words",
    [
        ([digit_tensor(2, data=[0.0] * 10)], b"", {}, "has 10 elements; its shape [2, 1, 28, 28] needs 1568"),
        (
            [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 100}}],
            b"\x00" * 100,
            {},
            "has 100 bytes; its shape",
        ),
        (
            [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 9999}}],
            b"\x00" * 100,
            {},
            "does not fit the binary data",
        ),
        ([digit_tensor(1)], b"\x00" * 8, {}, "8 bytes of binary data belong to no input"),
        ([digit_tensor(1), digit_tensor(1)], b"", {}, "given twice"),
        ([digit_tensor(1, data=[float("nan")] * 784)], b"", {}, "not valid JSON"),
        ([digit_tensor(1, data=["x"] * 784)], b"", {}, "must hold numbers"),
        ([digit_tensor(1, shape=[100000000, 1, 28, 28])], b"", {}, "1 to 64 per request"),
        ([digit_tensor(1, shape="big")], b"", {}, "needs a shape"),
        ([digit_tensor(1)], b"", {"outputs": [{"name": "probs"}]}, "unknown output 'probs'"),
        ([], b"", {}, "'inputs' must be a non-empty list"),
    ],
    ids=[
        "count",
        "binary size",
        "binary overrun",
        "extra bytes",
        "duplicate",
        "nan",
        "strings",
        "huge rows",
        "shape type",
        "unknown output",
        "no inputs",
    ],
)
def test_bad_tensors_get_400_naming_the_problem(client, inputs, binary, extra, words):
    r = infer(client, "digits", inputs, binary, **extra)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"], r.json()["error"]


def test_unknown_models_and_versions_are_404_and_health_is_open(make_app):
    c = make_app(api_key="k").client
    auth = {"Authorization": "Bearer k"}
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get("/v2/models/digits").status_code == 401
    assert c.get("/v2/models/digits", headers=auth).status_code == 200
    assert c.get("/v2/models/nope", headers=auth).status_code == 404
    assert c.get("/v2/models/digits/versions/1999/ready", headers=auth).status_code == 404
    r = c.post("/v2/models/digits/versions/1999/infer", json={"inputs": [digit_tensor(1)]}, headers=auth)
    assert r.status_code == 404 and "no loaded version" in r.json()["error"]
    assert c.post("/v2/models/digits/infer", json={"inputs": [digit_tensor(1)]}).status_code == 401
    version = active_meta("digits")["version"]
    assert (
        c.post(
            f"/v2/models/digits/versions/{version}/infer", json={"inputs": [digit_tensor(1)]}, headers=auth
        ).status_code
        == 200
    )


def test_request_ids_are_kept_when_safe_replaced_when_not_and_in_every_answer(client):
    r = client.post("/classify", json={"text": "fine"}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    for bad in ("has spaces in it", "x" * 300, "<script>"):
        r = client.post("/generate", json={"n": 0}, headers={"X-Request-ID": bad})
        rid = r.headers["x-request-id"]
        assert rid != bad and len(rid) == 16 and r.json()["request_id"] == rid
    assert client.get("/nope").headers["x-request-id"]
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = client.get("/models", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert r.headers["x-request-id"] == trace
    version, trace_id, span, flags = r.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", trace, "01") and span != "00f067aa0ba902b7"


def test_every_log_line_about_a_request_carries_its_id(make_app, caplog):
    c = make_app(access_log=True).client
    with caplog.at_level(logging.INFO, logger="deepserve"):
        c.post("/classify", json={"text": "fine"}, headers={"X-Request-ID": "trace-me-42"})
    lines = [r.getMessage() for r in caplog.records if "trace-me-42" in r.getMessage()]
    assert lines and all("request_id=trace-me-42" in line for line in lines)


def test_server_timing_names_the_stages_of_a_model_request(client):
    r = client.post(
        "/classify", files={"image": ("7.png", open("tests/fixtures/mnist_test0_label7.png", "rb").read(), "image/png")}
    )
    stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert {"read", "decode", "queue", "infer", "encode", "total"} <= set(stages)
    assert all(float(v) >= 0 for v in stages.values())
    assert float(stages["total"]) >= float(stages["infer"])
    r = client.post("/v2/models/digits/infer", json={"inputs": [digit_tensor(1)]})
    assert {"read", "decode", "queue", "infer", "encode", "total"} <= {
        p.split(";")[0].strip() for p in r.headers["server-timing"].split(",")
    }
