"""The one path of a model request, whatever the protocol (KServe's DataPlane.infer).

A protocol decides how a request names its model and version, how its body becomes a job and
how the result becomes an answer: the task routes (/classify, ...: service.routes) and the
Open Inference Protocol (/v2: service.v2). Everything between is here, once: the version is
resolved (the active one, or a pinned one that is loaded), the model's batcher may shed the
request before anything is decoded, a slot of model work is held while the body is decoded
and the job is batched, and the stages land in Server-Timing. The finish step (metrics, trust)
belongs to the job: the batch thread runs it for every protocol alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service import metrics, priority
from service.batching import Overloaded
from service.errors import ApiError, ClientGone, shown
from service.httpkit import Response
from service.runtime import Model
from service.tasks import Job


async def infer(
    app,
    req,
    name: str,
    version: str | None,
    decode: Callable[..., Awaitable[Job]],
    encode: Callable[[Model, Job, Any], Response],
    tensors: bool = False,
) -> Response:
    """Resolve `name` at `version` (None: active, or the candidate for a canary client), admit
    at the request's priority class, then in a slot `decode(model)` and batch the job;
    `encode(model, job, result)` makes the answer; a rollout's shadow gets its mirror after
    (`decode(candidate, detached request)`). With `tensors` (the request is tensors shaped for
    one signature) a candidate whose signature differs gets no share of it. NotServed,
    ApiError and Overloaded propagate to the app's one error table."""
    core = app.core
    cls = priority_of(req) if req.header("x-priority") else priority.INTERACTIVE
    model, batcher = core.resolve(name, version)
    rollouts, role = core.rollouts, "primary"
    running = rollouts.running and model.family in rollouts.running
    if running and version is None and rollouts.canary(model.family, req):
        target = core.candidate(name)
        if target is not None and not (tensors and target[0].meta.inputs != model.meta.inputs):
            (model, batcher), role = target, "canary"
    batcher.admit(1, cls=cls)  # shed before decoding anything when the model's queue is already too long
    async with app.work(req):
        job = await decode(model)
        if req.span is not None and req.span.is_recording():  # sampled: the batch span links back to it
            job.info["span"] = req.span
            req.span_attributes = {
                "deepserve.model": name,
                "deepserve.version": model.version,
                "deepserve.rows": job.rows,
            }
        submitted = time.perf_counter()
        if running:
            try:
                result = await batcher.submit(job, job.rows, req.alive, submitted - req.start, cls)
            except (Overloaded, ClientGone, asyncio.CancelledError, TimeoutError):
                raise
            except Exception:
                rollouts.observe(model.family, role, job, ok=False)
                raise
            rollouts.observe(model.family, role, job, ok=True)
            if role == "primary" and version is None:
                rollouts.mirror(model, decode, result, req, tensors)
        else:
            result = await batcher.submit(job, job.rows, req.alive, submitted - req.start, cls)
    if cls:  # the interactive class's wait is deepserve_stage_seconds{stage="queue"} (no second write per request)
        metrics.aggregate.observe("class_wait", (priority.CLASSES[cls],), job.queued_s)
    req.stage("queue", submitted, job.queued_s)
    req.stage("infer", submitted + job.queued_s, job.infer_s)
    started = time.perf_counter()
    resp = encode(model, job, result)
    req.stage("encode", started)
    return resp


def priority_of(req) -> int:
    """The request's priority class: header `X-Priority: interactive | batch` (default
    interactive; `shadow` is deepserve's own)."""
    value = req.header("x-priority")
    if not value:
        return priority.INTERACTIVE
    cls = priority.CLIENT_CLASSES.get(value.strip().lower())
    if cls is None:
        raise ApiError(
            400, f"X-Priority must be one of {sorted(priority.CLIENT_CLASSES)}, got {shown(value, 20)}", "bad_priority"
        )
    return cls
