"""deepserve's own Prometheus metrics, created lazily in each worker.

prometheus_client is imported on first use, after BentoML has set PROMETHEUS_MULTIPROC_DIR
in the worker, so every metric lands in the multiprocess files that /metrics aggregates
(an import-time metric would live in a private registry and never show up).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

# CPU inference of these models takes 0.1–50 ms per batch; buckets resolve that range.
SECONDS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


@functools.cache
def get() -> SimpleNamespace:
    """The metric objects (created once per process, on first call)."""
    import prometheus_client as prom

    return SimpleNamespace(
        inference_seconds=prom.Histogram(
            "deepserve_inference_seconds", "ONNX Runtime time per executed batch",
            ["model"], buckets=SECONDS_BUCKETS),
        batch_rows=prom.Histogram(
            "deepserve_batch_rows", "rows (images, texts, latents) per executed ONNX batch",
            ["model"], buckets=ROWS_BUCKETS),
        batch_requests=prom.Histogram(
            "deepserve_batch_requests", "HTTP requests merged into one executed batch",
            ["model"], buckets=ROWS_BUCKETS),
        rejected=prom.Counter(
            "deepserve_rejected_requests", "requests answered with an error, by endpoint and reason",
            ["endpoint", "reason"]),
        confidence=prom.Histogram(
            "deepserve_prediction_confidence", "top-1 probability of each classification",
            ["model"], buckets=CONFIDENCE_BUCKETS),
        model_info=prom.Gauge(
            "deepserve_model_info", "1 for every served model, with its version and execution provider",
            ["model", "version", "provider"], multiprocess_mode="max"),
    )  # fmt: skip


def observe_batch(model: str, rows: int, seconds: float) -> None:
    m = get()
    m.inference_seconds.labels(model).observe(seconds)
    m.batch_rows.labels(model).observe(rows)


def reject(endpoint: str, reason: str) -> None:
    get().rejected.labels(endpoint, reason).inc()
