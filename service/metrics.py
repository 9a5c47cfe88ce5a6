"""deepserve's own Prometheus metrics, created lazily in each worker.

prometheus_client is imported on first use, after BentoML has set PROMETHEUS_MULTIPROC_DIR
in the worker, so every metric lands in the multiprocess files that /metrics aggregates
(an import-time metric would live in a private registry and never show up).

Every label value comes from a fixed set: endpoints are route templates (unrouted paths are
one value, static files another), models and reasons come from the registry and the code,
status codes from what deepserve sends. So /metrics cannot grow with what clients send.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections import defaultdict
from types import SimpleNamespace

from service import compat, priority

# CPU inference of these models takes 0.1–50 ms per batch; buckets resolve that range.
SECONDS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0)
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    10.0,
    30.0,
    60.0,
)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
CONFIDENCE_DELTA_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
PSNR_BUCKETS = (5, 10, 15, 20, 25, 30, 35, 40, 50, 60, 100)
STAGES = ("read", "decode", "queue", "infer", "encode", "total")


def worker_index() -> str:
    """BentoML's worker index (1, 2, ...) in a worker; "0" outside a server."""
    return compat.worker_index()


@functools.cache
def get() -> SimpleNamespace:
    """The metric objects (created once per process, on first call)."""
    import prometheus_client as prom

    return SimpleNamespace(
        requests=prom.Counter(
            "deepserve_http_requests",
            "HTTP requests answered, by endpoint (route template) and status",
            ["endpoint", "code"],
        ),
        duration=prom.Histogram(
            "deepserve_http_request_duration_seconds",
            "time from the request's arrival to its last byte sent",
            ["endpoint", "code"],
            buckets=REQUEST_BUCKETS,
        ),
        stage=prom.Histogram(
            "deepserve_stage_seconds",
            "where a model request's time goes (the stages of Server-Timing)",
            ["endpoint", "stage"],
            buckets=SECONDS_BUCKETS,
        ),
        inference_seconds=prom.Histogram(
            "deepserve_inference_seconds", "ONNX Runtime time per executed batch", ["model"], buckets=SECONDS_BUCKETS
        ),
        batch_rows=prom.Histogram(
            "deepserve_batch_rows",
            "rows (images, texts, latents) per executed ONNX batch",
            ["model"],
            buckets=ROWS_BUCKETS,
        ),
        batch_requests=prom.Histogram(
            "deepserve_batch_requests", "HTTP requests merged into one executed batch", ["model"], buckets=ROWS_BUCKETS
        ),
        rejected=prom.Counter(
            "deepserve_rejected_requests",
            "requests answered with an error (or abandoned by their client), by endpoint and reason",
            ["endpoint", "reason"],
        ),
        confidence=prom.Histogram(
            "deepserve_prediction_confidence",
            "top-1 probability of each classification",
            ["model"],
            buckets=CONFIDENCE_BUCKETS,
        ),
        ood=prom.Counter(
            "deepserve_predictions",
            "classifications by model and whether the input looked like the training data (in_distribution true/false)",
            ["model", "in_distribution"],
        ),
        model_info=prom.Gauge(
            "deepserve_model_info",
            "1 for every model version a worker serves (0 once it stops), with its "
            "provider; `reason` says why CUDA was not used",
            ["model", "version", "provider", "reason", "worker"],
            multiprocess_mode="mostrecent",
        ),
        ood_baseline=prom.Gauge(
            "deepserve_ood_baseline_rate",
            "share of the model's validation split flagged out of distribution "
            "(the drift alert compares the live share with it)",
            ["model"],
            multiprocess_mode="max",
        ),
        swaps=prom.Counter(
            "deepserve_model_swaps", "model version changes attempted, by family and outcome", ["family", "outcome"]
        ),
        # priority classes (service.priority)
        class_wait=prom.Histogram(
            "deepserve_priority_wait_seconds",
            "time a batch-class model request waited for its batch (the interactive class's wait is "
            'deepserve_stage_seconds{stage="queue"})',
            ["class"],
            buckets=SECONDS_BUCKETS,
        ),
        class_shed=prom.Counter(
            "deepserve_priority_shed",
            "model requests shed by the batchers (503: at admission, or queued lower-class work shed for "
            "higher-class work) and shadow requests dropped, by priority class",
            ["class"],
        ),
        class_queued=prom.Gauge(
            "deepserve_priority_queued",
            "model requests queued for a batch, by priority class",
            ["class", "worker"],
            multiprocess_mode="livesum",
        ),
        # rollouts: shadow and canary (service.rollout)
        rollout_requests=prom.Counter(
            "deepserve_rollout_requests",
            "requests of a family during a rollout, by role (primary: the active version's answers, canary: the "
            "candidate's answers, shadow: mirrored to the candidate) and outcome (ok, error, dropped)",
            ["family", "role", "outcome"],
        ),
        rollout_latency=prom.Histogram(
            "deepserve_rollout_compute_seconds",
            "model compute per request during a rollout (its share of its batch's ONNX time), by role",
            ["family", "role"],
            buckets=SECONDS_BUCKETS,
        ),
        shadow_rows=prom.Counter(
            "deepserve_shadow_compared_rows",
            "rows answered by both versions, by whether they agree (classifiers: the same label; images: PSNR at "
            "least the policy's min_psnr_db)",
            ["family", "agree"],
        ),
        shadow_confidence_delta=prom.Histogram(
            "deepserve_shadow_confidence_delta",
            "|candidate's top-1 probability - active version's| per compared row (classifiers)",
            ["family"],
            buckets=CONFIDENCE_DELTA_BUCKETS,
        ),
        shadow_ood_flips=prom.Counter(
            "deepserve_shadow_ood_flips",
            "compared rows whose in-distribution verdict differs between the versions (classifiers)",
            ["family"],
        ),
        shadow_psnr=prom.Histogram(
            "deepserve_shadow_psnr_db",
            "PSNR between the versions' outputs for the same input and seed (generator, codec, denoiser)",
            ["family"],
            buckets=PSNR_BUCKETS,
        ),
        rollout_agreement=prom.Gauge(
            "deepserve_rollout_agreement",
            "the running rollout's agreement so far (all workers: classifiers' label agreement, else the share of "
            "rows at or over min_psnr_db); -1 before any comparison",
            ["family"],
            multiprocess_mode="mostrecent",
        ),
        rollout_decisions=prom.Counter(
            "deepserve_rollout_decisions",
            "rollouts ended, by family and decision (promoted, rolled_back, stopped, promotion_failed: a worker "
            "refused the promoted version and the old one is back) and by whom (policy, operator)",
            ["family", "decision", "by"],
        ),
    )


class Aggregator:
    """Per-request observations, summed in memory and written to the metrics about once a
    second (and before every scrape). In multiprocess mode every observe() is a locked
    write into a memory-mapped file: per request (status, duration, six stages, a
    confidence per answer) that cost about 5% of /classify's throughput on one core; a
    flush writes each bucket that changed once."""

    BUCKETS = {
        "duration": REQUEST_BUCKETS,
        "stage": SECONDS_BUCKETS,
        "confidence": CONFIDENCE_BUCKETS,
        "class_wait": SECONDS_BUCKETS,
        "rollout_latency": SECONDS_BUCKETS,
        "shadow_confidence_delta": CONFIDENCE_DELTA_BUCKETS,
        "shadow_psnr": PSNR_BUCKETS,
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple, float] = defaultdict(float)
        self.histograms: dict[tuple, list] = {}
        self.pending: list[tuple[str, dict]] = []  # (endpoint, Server-Timing stages), bucketed at flush
        self.gauges: list = []  # callables that set gauges, run at each flush

    def stages(self, endpoint: str, timings: dict[str, float]) -> None:
        """A request's stage timings, kept as they are until the flush (one append per request:
        bucketing six stages per request cost ~2.5% of /classify text)."""
        self.pending.append((endpoint, timings))

    def inc(self, metric: str, labels: tuple, n: float = 1.0) -> None:
        if priority.in_shadow():  # a mirrored request's trust metrics are not traffic
            return
        with self.lock:
            self.counters[(metric, labels)] += n

    def observe(self, metric: str, labels: tuple, value: float) -> None:
        bounds = self.BUCKETS[metric]
        i = bisect.bisect_left(bounds, value)  # the first bucket whose bound is >= value (len: +Inf)
        with self.lock:
            h = self.histograms.get((metric, labels))
            if h is None:
                h = self.histograms[(metric, labels)] = [0.0, [0] * (len(bounds) + 1)]
            h[0] += value
            h[1][i] += 1

    def observe_many(self, metric: str, labels: tuple, values: list[float]) -> None:
        """observe() for each value, under one lock (a batch's classifications)."""
        if priority.in_shadow():
            return
        bounds = self.BUCKETS[metric]
        where = [bisect.bisect_left(bounds, v) for v in values]
        with self.lock:
            h = self.histograms.get((metric, labels))
            if h is None:
                h = self.histograms[(metric, labels)] = [0.0, [0] * (len(bounds) + 1)]
            counts = h[1]
            for v, i in zip(values, where):
                h[0] += v
                counts[i] += 1

    def flush(self) -> None:
        for gauge in self.gauges:  # values read at flush time (queue depths)
            gauge()
        pending, self.pending = self.pending, []
        for endpoint, timings in pending:
            for stage, seconds in timings.items():
                self.observe("stage", (endpoint, stage), seconds)
        with self.lock:
            counters, histograms = self.counters, self.histograms
            self.counters, self.histograms = defaultdict(float), {}
        m = get()
        for (metric, labels), n in counters.items():
            getattr(m, metric).labels(*labels).inc(n)
        for (metric, labels), (total, counts) in histograms.items():
            compat.histogram_add(getattr(m, metric).labels(*labels), total, counts)  # one write per bucket


aggregate = Aggregator()


def observe_batch(model: str, rows: int, seconds: float) -> None:
    if priority.in_shadow():  # the candidate's mirrored runs: deepserve_rollout_* only
        return
    m = get()
    m.inference_seconds.labels(model).observe(seconds)
    m.batch_rows.labels(model).observe(rows)


def observe_requests(model: str, requests: int, rows: int, seconds: float) -> None:
    get().batch_requests.labels(model).observe(requests)


def watch_gate(gate) -> None:
    """deepserve_priority_queued from this worker's gate at every flush."""

    for name in priority.CLASSES:  # every class's shed series exists from the start (0, not absent)
        get().class_shed.labels(name)

    def gauge() -> None:
        queued = get().class_queued
        for i, name in enumerate(priority.CLASSES):
            queued.labels(name, worker_index()).set(gate.waiting[i])

    aggregate.gauges.append(gauge)


def priority_shed(model: str, cls: int) -> None:
    aggregate.inc("class_shed", (priority.CLASSES[cls],))


def reject(endpoint: str, reason: str) -> None:
    get().rejected.labels(endpoint, reason).inc()


def model_served(model, value: int) -> None:
    ood = getattr(model.meta, "ood", None)
    if ood is not None and value:
        get().ood_baseline.labels(model.name).set(ood.baseline_ood_rate)
    get().model_info.labels(
        model.name, model.version, model.provider, (model.provider_reason or "")[:120], worker_index()
    ).set(value)
