"""Traces through BentoML's own tracing configuration, received by a real OTLP/HTTP endpoint
(protobuf) started here: a server span per request (the client's traceparent honoured), its
stages as children, and each ONNX batch as a span linked to every request it served."""

from __future__ import annotations

import http.server
import re
import threading
import time

import httpx
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service import tracing
from tests.conftest import FIXTURES
from tests.service.conftest import Server, free_port

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace endpoint: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self):
        self.spans: list = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with receiver.lock:
                    for rs in req.resource_spans:
                        for ss in rs.scope_spans:
                            receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait(self, condition, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if condition(spans):
                return spans
            time.sleep(0.2)
        raise AssertionError(f"spans never arrived: {[s.name for s in spans]}")


@pytest.fixture(scope="module")
def traced():
    receiver = Receiver()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    options = (
        "services.deepserve.tracing.exporter_type=otlp services.deepserve.tracing.sample_rate=1.0 "
        f"services.deepserve.tracing.otlp.protocol=http services.deepserve.tracing.otlp.endpoint={endpoint}"
    )
    server = Server(
        env={"BENTOML_CONFIG_OPTIONS": options, "OTEL_BSP_SCHEDULE_DELAY": "100", "DEEPSERVE_ACCESS_LOG": "true"}
    )
    yield server, receiver
    server.stop()
    receiver.shutdown()


def hexid(raw: bytes) -> str:
    return raw.hex()


def test_every_model_request_is_a_span_with_its_stages_and_its_batch(traced):
    server, receiver = traced
    c = httpx.Client(base_url=server.url, timeout=30)
    ids = [f"spans-{k}" for k in range(4)]  # this test's requests, whatever else the server traced
    r1 = c.post(
        "/classify",
        files={"image": ("7.png", SEVEN, "image/png")},
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": ids[0]},
    )
    r2 = c.post("/classify", json={"text": "a gorgeous, witty film"}, headers={"X-Request-ID": ids[1]})
    r3 = c.post("/generate", json={"n": 4, "seed": 1, "format": "json"}, headers={"X-Request-ID": ids[2]})
    x = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(FIXTURES / "mnist_test0_label7.png")) / 255.0
    r4 = c.post(
        "/v2/models/digits/infer",
        json={"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]},
        headers={"X-Request-ID": ids[3]},
    )
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200] * 4, [r.text[:200] for r in (r1, r2, r3, r4)]
    names = ("POST /classify", "POST /generate", "POST /v2/models/{name}/infer")
    attrs = lambda s: {a.key: (a.value.string_value or a.value.int_value) for a in s.attributes}
    ours = lambda ss: [s for s in ss if attrs(s).get("deepserve.request_id") in ids]
    spans = receiver.wait(
        lambda ss: (
            len(ours(ss)) == 4 and all(any(lk.span_id == s.span_id for b in ss for lk in b.links) for s in ours(ss))
        )
    )
    by_id = {hexid(s.span_id): s for s in spans}
    server_spans = ours(spans)
    assert sorted(s.name for s in server_spans) == sorted(["POST /classify", "POST /classify", *names[1:]])

    # the client's traceparent: same trace, its span as parent, and the answer names our span
    image = next(s for s in server_spans if hexid(s.trace_id) == TRACE_ID)
    assert hexid(image.parent_span_id) == PARENT_ID
    assert r1.headers["traceparent"] == f"00-{TRACE_ID}-{hexid(image.span_id)}-01"
    a = attrs(image)
    assert a["http.route"] == "/classify" and a["deepserve.model"] == "digits" and a["http.response.status_code"] == 200
    assert a["deepserve.rows"] == 1 and a["deepserve.version"] == r1.json()["model_version"]
    stages = [s for s in spans if hexid(s.parent_span_id) == hexid(image.span_id)]
    assert {s.name for s in stages} >= {"read", "decode", "queue", "infer", "encode"}, [s.name for s in stages]
    for s in stages:
        assert image.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano

    # every request without a traceparent starts a trace of its own
    others = [s for s in server_spans if s is not image]
    assert all(not s.parent_span_id for s in others) and len({hexid(s.trace_id) for s in others}) == 3
    models = {attrs(s)["deepserve.model"] for s in server_spans}
    assert models == {"digits", "sentiment", "generator"}

    # each request is linked from the batch that served it, with the batch's size
    for s in server_spans:
        batches = [b for b in spans if b.name.startswith("batch ") and any(lk.span_id == s.span_id for lk in b.links)]
        assert len(batches) == 1, (s.name, [b.name for b in spans if b.name.startswith("batch ")])
        b = attrs(batches[0])
        assert b["deepserve.batch.requests"] >= 1 and b["deepserve.batch.rows"] >= attrs(s)["deepserve.rows"]
        assert batches[0].name == f"batch {attrs(s)['deepserve.model']}"
    assert all(hexid(s.parent_span_id) in by_id or s.name in names or s.name.startswith("batch ") for s in spans)


def test_log_lines_about_a_request_carry_its_trace_and_span_ids(traced):
    server, _ = traced
    r = httpx.post(server.url + "/classify", json={"text": ""}, headers={"X-Request-ID": "trace-log-test"})
    assert r.status_code == 400
    deadline = time.monotonic() + 10
    while not (lines := [line for line in server.log().splitlines() if "request_id=trace-log-test" in line]):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)
    assert all(re.search(r"trace_id=[0-9a-f]{32} span_id=[0-9a-f]{16}", line) for line in lines), lines


def test_without_an_exporter_no_span_is_ever_made():
    """Tracing off (no exporter configured): the tracer stays None, so the request path makes
    no span objects at all (a sample rate of 0 would still record them)."""
    assert tracing.setup() is False and tracing.TRACER is None
