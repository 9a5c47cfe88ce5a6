"""OpenTelemetry spans for every model request, through BentoML's own tracing configuration.

Turned on the way a BentoML user turns tracing on (`services.deepserve.tracing` in a
BENTOML_CONFIG file or BENTOML_CONFIG_OPTIONS: exporter_type, sample_rate, otlp.protocol,
otlp.endpoint); deepserve has no switch of its own. With no exporter configured `TRACER` stays
None and no span object is ever made: the request path pays one `is None` check.

Per request: a SERVER span named after the route template (`POST /classify`), the child of
the client's W3C `traceparent` when it sent one (else a new trace), with the model, version,
rows and status; one child span per stage it went through (read, decode, queue, infer,
encode: the Server-Timing stages, at the times they ran). Per
executed batch: a span `batch <model>` with the batch's requests and rows, linked to the span
of every request it served (a batch that served 40 requests is found from any of them).
"""

from __future__ import annotations

import time
from typing import Any

from service.compat import tracer_provider

TRACER: Any = None  # opentelemetry Tracer, set once per worker by `setup()` when tracing is on
STAGES = ("read", "decode", "queue", "infer", "encode")


def setup() -> bool:
    """Take BentoML's tracer provider for this worker if tracing is configured."""
    global TRACER
    provider = tracer_provider()
    TRACER = provider.get_tracer("deepserve") if provider is not None else None
    return TRACER is not None


def now_ns(perf: float) -> int:
    """A perf_counter() reading -> wall-clock nanoseconds (spans take wall-clock times)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def start_request(req) -> Any:
    """The request's SERVER span, started at its arrival, child of the client's traceparent."""
    from opentelemetry import trace  # on use: a worker without tracing never imports the SDK
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

    parent = None
    if req.trace is not None:
        _, trace_id, span_id, flags = req.trace
        ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)))
        parent = trace.set_span_in_context(NonRecordingSpan(ctx))
    return TRACER.start_span(
        f"{req.method} {req.path}", context=parent, kind=SpanKind.SERVER, start_time=now_ns(req.start)
    )


def end_request(req, status: int) -> None:
    """Name the span after its route, add what the request was, its stages as child spans."""
    from opentelemetry import trace  # on use (see start_request)
    from opentelemetry.trace import Status, StatusCode

    span = req.span
    if not span.is_recording():  # not sampled: nothing to name, time or export
        return
    span.update_name(f"{req.method} {req.endpoint}")
    span.set_attribute("http.request.method", req.method)
    span.set_attribute("http.route", req.endpoint)
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("deepserve.request_id", req.id)
    for key, value in (req.span_attributes or {}).items():
        span.set_attribute(key, value)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    ctx = trace.set_span_in_context(span)
    starts = req.starts or {}
    for stage in STAGES:
        seconds, started = req.timings.get(stage), starts.get(stage)
        if seconds is None or started is None:
            continue
        t = now_ns(started)
        TRACER.start_span(stage, context=ctx, start_time=t).end(end_time=t + int(seconds * 1e9))
    span.end()


def batch(model: str, jobs: list, rows: int, start_perf: float, seconds: float) -> None:
    """One executed batch as a span linked to every request span it served."""
    from opentelemetry.trace import Link  # on use (see start_request)

    spans = [getattr(job, "info", {}).get("span") for job in jobs]
    links = [Link(span.get_span_context()) for span in spans if span is not None and span.is_recording()]
    if not links:  # warm-up, or no sampled request in it
        return
    start = now_ns(start_perf)
    span = TRACER.start_span(
        f"batch {model}",
        start_time=start,
        links=links,
        attributes={"deepserve.model": model, "deepserve.batch.requests": len(jobs), "deepserve.batch.rows": rows},
    )
    span.end(end_time=start + int(seconds * 1e9))
