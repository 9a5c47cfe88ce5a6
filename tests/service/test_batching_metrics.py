"""Batching really happens, and the probes, metrics and OpenAPI document are there."""

import asyncio
import re

import httpx
import numpy as np

from tests.conftest import png


def scrape(client) -> dict[str, float]:
    """/metrics as {series-with-labels: value} (samples only)."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def series(metrics: dict, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name and all(w in k for w in want))


def test_concurrent_requests_are_run_as_one_onnx_batch(server, client, mnist500):
    images, labels = mnist500
    before = scrape(client)

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            reqs = [ac.post("/classify", files={"image": ("d.png", png(images[i]), "image/png")}) for i in range(96)]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert (
        np.mean([r.json()["index"] == y for r, y in zip(responses, labels)]) >= 0.97
    )  # answers not mixed up (mixed: ~0.1)
    after = scrape(client)
    rows = series(after, "deepserve_batch_rows_sum", model="digits") - series(
        before, "deepserve_batch_rows_sum", model="digits"
    )
    batches = series(after, "deepserve_batch_rows_count", model="digits") - series(
        before, "deepserve_batch_rows_count", model="digits"
    )
    requests = series(after, "deepserve_batch_requests_sum", model="digits") - series(
        before, "deepserve_batch_requests_sum", model="digits"
    )
    assert rows == 96 and requests == 96
    assert batches < 96 / 2, f"{batches} ONNX runs for 96 concurrent requests: batching did not merge them"


def test_all_deepserve_metrics_are_exported(client):
    client.post("/classify", json={"text": "fine"})
    client.post("/generate", json={"n": 0})  # a rejection
    text = client.get("/metrics").text
    for name in (
        "deepserve_inference_seconds_bucket",
        "deepserve_batch_rows_bucket",
        "deepserve_rejected_requests_total",
        "deepserve_prediction_confidence_bucket",
        "deepserve_model_info",
    ):
        assert name in text, name
    assert re.search(r'deepserve_rejected_requests_total\{endpoint="/generate",reason="out_of_range"\} [1-9]', text)
    assert re.search(
        r'deepserve_model_info\{model="digits",provider="CPUExecutionProvider",reason="[^"]*",version="[^"]+",worker="1"\} 1.0',
        text,
    )
    assert 'le="0.001"' in text  # buckets resolve milliseconds
    assert re.search(r'deepserve_http_requests_total\{code="200",endpoint="/classify"\} [1-9]', text)
    assert re.search(r'deepserve_stage_seconds_count\{endpoint="/classify",stage="infer"\} [1-9]', text)
    assert re.search(r'deepserve_predictions_total\{in_distribution="true",model="sentiment"\} [1-9]', text)
    assert re.search(r'deepserve_ood_baseline_rate\{model="digits"\} 0\.0\d+', text)
    assert "bentoml_service_request_total" in text  # BentoML's own metrics are still there (its probes)


def test_probes(client):
    for probe in ("/livez", "/healthz", "/readyz"):
        assert client.get(probe).status_code == 200


def test_openapi_document_describes_every_endpoint(client):
    doc = client.get("/docs.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/classify", "/generate", "/compress", "/decompress", "/denoise", "/models"):
        assert path in doc["paths"]
        op = next(iter(doc["paths"][path].values()))
        assert "200" in op["responses"] and "503" in op["responses"]
    assert "multipart/form-data" in doc["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert client.get("/openapi.json").json() == doc
