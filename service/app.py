"""deepserve's HTTP front door: one ASGI callable, built from a Core (`build_app(core)`).

It sits in front of BentoML's own app (service.service) and answers every deepserve route
itself; BentoML keeps its probes and /metrics, which are passed through. Doing the whole
request path in one layer is what keeps it fast (no per-request middleware stack or timer
task) and what lets it protect the other clients from any one of them:

- work per request is bounded: body bytes, decoded pixels per image and per request (from
  headers, before decoding), rows per request; large images decode in a bounded thread pool;
- a request counts against `max_concurrency` only once its body has arrived (it needs model
  work), so slow or stalled uploads cannot fill the service; a body that makes no progress
  for `body_idle_timeout_s`, or that averages under `body_min_rate` bytes/s after
  `body_rate_grace_s` (a slow drip), gets 408 and its connection is closed;
- once a request has failed, timed out or lost its client, no new decode or model work
  starts for it; a client that hangs up is counted as `client_closed`, never as a 5xx;
- overload answers 503 early (before the body is read) and holds it for `shed_hold_ms`, so
  clients that retry at once cannot spin the CPU on rejections;
- every metric label comes from a fixed set (route templates, one value for unrouted paths);
- every answer carries X-Request-ID and model answers Server-Timing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hmac
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.cors import CORSMiddleware

from service import compat, images, metrics, tasks, tracing
from service import routes as route_table
from service.batching import Overloaded
from service.core import Core, NotServed
from service.errors import ApiError, ClientGone, shown
from service.httpkit import Handler, Response, Route, json_response, parse_json
from service.settings import Settings

log = logging.getLogger("deepserve")

REQUEST_ID = contextvars.ContextVar("deepserve_request_id", default="-")
SAFE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
FLUSH_S = 1.0  # aggregated request metrics are written at least this often (service.metrics)
INLINE_PIXELS = 256 * 256  # a request whose images total fewer pixels decodes on the event loop
INLINE_FRAMED_PIXELS = 64 * 64  # ... when the model frames its subject (~3 ms for a 256×256 picture)
JSON_OFF_LOOP = 64 * 1024  # larger JSON bodies are parsed in a thread
PASSTHROUGH = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})  # BentoML's own routes


_ids = {"pid": 0, "prefix": "", "counter": itertools.count()}


def new_id() -> str:
    """16 hex digits, unique: a random per-process prefix and a counter. No syscall per
    request: os.urandom releases the GIL, and getting it back from a busy batch thread can
    take a whole switch interval (this alone cost ~10% under load)."""
    pid = os.getpid()
    if _ids["pid"] != pid:  # per process, after BentoML forks its workers
        _ids.update(pid=pid, prefix=os.urandom(4).hex(), counter=itertools.count())
    return f"{_ids['prefix']}{next(_ids['counter']) & 0xFFFFFFFF:08x}"


class RequestIdFilter(logging.Filter):
    """Every deepserve log line about a request carries its id (and, when tracing is on, its
    trace id and span id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        if rid != "-" and not getattr(record, "_rid_added", False):
            record.msg = f"[request_id={rid}] {record.msg}"
            record._rid_added = True
        return True


log.addFilter(RequestIdFilter())


class Request:
    """One HTTP request as the handlers see it (a thin, allocation-light view of the scope)."""

    __slots__ = (
        "scope",
        "receive",
        "method",
        "path",
        "_headers",
        "id",
        "trace",
        "start",
        "timings",
        "endpoint",
        "cancelled",
        "app",
        "settings",
        "_hung_up",
        "span",
        "span_attributes",
        "starts",
        "decoded",
    )

    def __init__(self, app: App, scope, receive):
        self.app, self.scope, self.receive = app, scope, receive
        self.settings = app.settings
        self.method, self.path = scope["method"], scope["path"]
        self._headers: dict[str, str] | None = None
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.endpoint = "unrouted"
        self.cancelled = threading.Event()  # set when the request ends without an answer in flight
        self._hung_up = compat.disconnect_probe(receive)  # None: the server does not say (a test client)
        self.trace = None  # (version, trace id, parent span id, flags) from a W3C traceparent
        self.span = self.span_attributes = self.starts = None  # tracing on: its span, stage start times
        self.decoded = None  # (files, preprocessing, images): the last decode, for a shadow of this request
        self.id = self._request_id()

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.scope["headers"]}
        return self._headers

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def _request_id(self) -> str:
        tp = TRACEPARENT.match(self.header("traceparent").strip().lower())
        if tp and tp.group(2) != "0" * 32:
            self.trace = (tp.group(1), tp.group(2), tp.group(3), tp.group(4))
        given = self.header("x-request-id").strip()
        if SAFE_ID.match(given):
            return given
        return self.trace[1] if self.trace else new_id()

    def stage(self, name: str, started: float, seconds: float | None = None) -> None:
        """A stage of the request (Server-Timing; its start too when the request is traced)."""
        self.timings[name] = time.perf_counter() - started if seconds is None else seconds
        if self.span is not None:
            (self.starts if self.starts is not None else self._new_starts())[name] = started

    def _new_starts(self) -> dict[str, float]:
        self.starts = {}
        return self.starts

    def detached(self) -> Request:
        """A copy for work that outlives the answer (a shadow request's decode): its own
        timings, no span, never hung up; the client's request is left as it is."""
        r = object.__new__(Request)
        for name in Request.__slots__:
            setattr(r, name, getattr(self, name))
        r.timings, r.span, r.span_attributes, r.starts = {}, None, None, None
        r.cancelled, r._hung_up = threading.Event(), None
        return r

    def hung_up(self) -> bool:
        """True once the client's connection is closed, as far as the kernel can tell: the
        event loop's flag, else a look at the socket itself (a loop that was blocked runs a
        due timer, the end of a shed's hold, before it reads the hang-up that came first)."""
        return self._hung_up is not None and (self._hung_up() or compat.peer_closed(self.receive))

    def alive(self) -> bool:
        """False once the client has hung up (or the request was given up)."""
        if self.cancelled.is_set():
            return False
        return self._hung_up is None or not self._hung_up()

    def media_type(self) -> str:
        return self.header("content-type").split(";")[0].strip().lower()

    # -------------------------------------------------------------- body

    async def body(self, limit: int) -> bytes:
        """The whole body, or 413 past `limit`, 408 when it stalls, ClientGone on hang-up."""
        started = time.perf_counter()
        declared = self.header("content-length")
        if declared:
            if not declared.isdigit():
                raise ApiError(400, "Content-Length is not a number", "bad_header")
            if int(declared) > limit:
                raise ApiError(
                    413, f"request body is {int(declared)} bytes; the limit is {limit}", "too_large", limit=limit
                )
        chunks, size, idle = [], 0, self.settings.body_idle_timeout_s
        rate, grace = self.settings.body_min_rate, self.settings.body_rate_grace_s
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def deadline() -> float:
            """The earlier of: no progress for `idle`; falling behind `rate` bytes/s after `grace`."""
            stall = loop.time() + idle
            return min(stall, t0 + grace + size / rate) if rate else stall

        try:
            async with asyncio.timeout_at(deadline()) as timer:
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    if chunk:
                        size += len(chunk)
                        if size > limit:
                            raise ApiError(
                                413, f"request body is over the {limit}-byte limit", "too_large", limit=limit
                            )
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                    timer.reschedule(deadline())
        except TimeoutError:
            elapsed = loop.time() - t0
            if rate and elapsed >= grace + size / rate - 1e-3:
                raise ApiError(
                    408,
                    f"the request body arrived at {size / max(elapsed, 1e-9):.0f} bytes/s ({size} bytes in "
                    f"{elapsed:.1f} s); the minimum is {rate} bytes/s after {grace:g} s",
                    "body_too_slow",
                    limit=rate,
                ) from None
            raise ApiError(
                408, f"the request body made no progress for {idle:g} s ({size} bytes received)", "body_timeout"
            ) from None
        self.stage("read", started)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json_body(self, limit: int) -> Any:
        body = await self.body(limit)
        if len(body) > JSON_OFF_LOOP:
            return await self.app.offload(parse_json, body)
        return parse_json(body)

    async def form(self, limit: int, max_files: int) -> tuple[list[bytes], dict[str, Any]]:
        """multipart/form-data -> (the `image` files' bytes, the other fields JSON-decoded
        where they are JSON, as BentoML's client sends them)."""
        body = await self.body(limit)

        async def replay():
            yield body

        parser = MultiPartParser(
            Headers(scope=self.scope), replay(), max_files=max_files, max_fields=16, max_part_size=64 * 1024
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, f"malformed multipart body: {exc.message}", "bad_multipart") from None
        files, fields = [], {}
        for key, value in form.multi_items():
            if key == "image":
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "field 'image' must be a file part (with a filename)", "bad_field")
                files.append(await value.read())
            elif isinstance(value, UploadFile):
                raise ApiError(400, f"field {shown(key)} must be a plain form field, not a file", "bad_field")
            elif key in fields:
                raise ApiError(400, f"field {shown(key)} is given twice", "bad_field")
            else:
                decoded = form_value(value)
                # a text is a text: curl's `-F text=42` stays "42" (BentoML's client JSON-encodes it)
                fields[key] = value if key == "text" and not isinstance(decoded, str) else decoded
        return files, fields

    async def urlencoded(self, limit: int) -> dict[str, Any]:
        """application/x-www-form-urlencoded (what BentoML's client sends when a call has no
        file: text for /classify) -> fields, decoded like multipart fields."""
        body = await self.body(limit)
        try:
            pairs = parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body), max_num_fields=16
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"malformed form body: {str(exc)[:80]}", "bad_multipart") from None
        fields: dict[str, Any] = {}
        for key, value in pairs:
            if key in fields:
                raise ApiError(400, f"field {shown(key)} is given twice", "bad_field")
            decoded = form_value(value)
            fields[key] = value if key == "text" and not isinstance(decoded, str) else decoded
        return fields

    # -------------------------------------------------------------- tasks.Context

    async def decode_images(self, files: list[bytes], pre) -> np.ndarray:
        """Uploaded files -> (N, 28, 28) float32 framed by the model's preprocessing `pre`, each checked from its header first.
        The same files under the same preprocessing again (a shadow of this request on a candidate
        version) reuse the decoded images: the shadow costs only its model run."""
        last = self.decoded
        if last is not None and last[0] is files and last[1] == pre:
            return last[2]
        s = self.settings
        labels = ["image" if len(files) == 1 else f"image #{i + 1}" for i in range(len(files))]
        uploads = [images.probe(data, label, s.max_image_pixels) for data, label in zip(files, labels)]
        total = sum(u.pixels for u in uploads)
        if total > s.max_request_pixels:
            raise ApiError(
                413,
                f"the images hold {total} pixels together; the limit per request is {s.max_request_pixels}",
                "too_many_pixels",
                limit=s.max_request_pixels,
            )
        started = time.perf_counter()
        if total <= (INLINE_PIXELS if pre.framing == "none" else INLINE_FRAMED_PIXELS):
            arrays = [images.decode(u, pre) for u in uploads]
        else:
            arrays = await self.app.decode_off_loop(self, uploads, pre, total)
        self.stage("decode", started)
        out = np.stack(arrays)
        self.decoded = (files, pre, out)
        return out


def form_value(value: str) -> Any:
    """A form field as BentoML's client sends it (JSON-encoded) or as curl does (plain)."""
    if value[:1] in '"[{-0123456789tfn' and len(value) <= 4096:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    return value


def _decode_all(req: Request, uploads: list[images.Upload], pre) -> list[np.ndarray]:
    out = []
    for u in uploads:
        if not req.alive():  # failed, timed out or hung up: no more work for it
            raise ClientGone
        out.append(images.decode(u, pre))
    return out


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


class Slots:
    """A counting semaphore whose waiters are served first come, first served, and give up
    after a timeout; a released slot passes straight to the oldest waiter."""

    def __init__(self, n: int):
        self.n, self.taken = n, 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self, timeout: float) -> bool:
        if self.taken < self.n and not self.waiters:
            self.taken += 1
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut = loop.create_future()  # result: True = release() handed it a slot, False = timed out
        self.waiters.append(fut)
        timer = loop.call_later(timeout, _expire, fut)  # cheaper than asyncio.wait per waiter
        try:
            got = await fut
        except BaseException:  # the request was cancelled while it waited
            timer.cancel()
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # a slot had just been handed to it: pass it on
            self._forget(fut)
            raise
        timer.cancel()
        if got:
            return True  # release() handed this request its slot (taken stays counted)
        self._forget(fut)
        return False

    def _forget(self, fut: asyncio.Future) -> None:
        fut.cancel()
        with contextlib.suppress(ValueError):
            self.waiters.remove(fut)

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot moves to this waiter: taken is unchanged
                return
        self.taken -= 1


class App:
    """The ASGI app. `core` may be bound later (BentoML creates it in the worker's start-up)."""

    def __init__(self, settings: Settings, core: Core | None = None, fallback=None, drain=None):
        self.settings, self.core, self.fallback, self.drain = settings, core, fallback, drain
        self.follower = None  # service.versions.Follower, in a served worker
        self.slots = Slots(settings.max_concurrency)  # requests past their body, doing model work
        self.handling = 0  # every request being handled, body reads included (the drain waits)
        self.routes: dict[str, Route] = {}
        self.prefixes: list[tuple[str, Callable[[str], tuple[Route, dict] | None]]] = []
        self._hold = settings.shed_hold_ms / 1000
        self._flusher: asyncio.TimerHandle | None = None  # the next write of aggregated metrics
        route_table.install(self)

    def bind(self, core: Core, drain=None) -> None:
        self.core, self.drain = core, drain

    def add(
        self, path: str, handler: Handler, methods=("GET",), model_work: bool = False, endpoint: str | None = None
    ) -> None:
        self.routes[path] = Route(endpoint or path, tuple(methods), handler, model_work)

    def add_prefix(self, prefix: str, match: Callable[[str], tuple[Route, dict] | None]) -> None:
        self.prefixes.append((prefix, match))

    async def offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.core.decode_pool, fn, *args)

    async def decode_off_loop(self, req: Request, uploads, pre, pixels: int) -> list[np.ndarray]:
        core = self.core
        if core.decode_backlog + pixels > self.settings.decode_backlog_pixels and core.decode_backlog:
            raise Overloaded("the image decoder is busy with large images")
        core.decode_backlog += pixels
        try:
            return await self.offload(_decode_all, req, uploads, pre)
        finally:
            core.decode_backlog -= pixels

    # -------------------------------------------------------------- ASGI

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind != "http":
            if self.fallback is not None:
                return await self.fallback(scope, receive, send)
            if kind == "lifespan":  # in-process use without BentoML: nothing to start
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path in PASSTHROUGH and self.fallback is not None:
            if path == "/metrics":
                metrics.aggregate.flush()  # what this worker counted so far is in the scrape
            return await self.fallback(scope, receive, send)
        await self.handle(scope, receive, send, path)

    async def handle(self, scope, receive, send, path: str) -> None:
        req = Request(self, scope, receive)
        if tracing.TRACER is not None:
            req.span = tracing.start_request(req)
            ctx = req.span.get_span_context()
            token = REQUEST_ID.set(f"{req.id} trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}")
        else:
            token = REQUEST_ID.set(req.id)
        self.handling += 1
        route, params = self.routes.get(path), None
        if route is None:
            for prefix, match in self.prefixes:
                if path.startswith(prefix):
                    found = match(path)
                    if found is not None:
                        route, params = found
                    break
        try:
            resp = await self.dispatch(req, route, params)
        finally:
            self.handling -= 1
        if resp is None:  # the client hung up: nothing to send
            req.cancelled.set()
            self.record(req, 499)
            REQUEST_ID.reset(token)
            return
        if resp.status >= 400:
            req.cancelled.set()
        await self.send(req, resp, send)
        REQUEST_ID.reset(token)

    async def dispatch(self, req: Request, route: Route | None, params: dict | None) -> Response | None:
        try:
            if route is None:
                raise ApiError(
                    404, f"no such path {shown(req.path, 100)}; the API is described at /docs.json", "unrouted"
                )
            req.endpoint = route.endpoint
            if req.method not in route.methods and not (req.method == "HEAD" and "GET" in route.methods):
                raise ApiError(
                    405,
                    f"{req.method} is not allowed on {route.endpoint}; use {', '.join(route.methods)}",
                    "wrong_method",
                    allow=", ".join(route.methods),
                )
            if not route.model_work:
                return await (route.handler(req, **params) if params else route.handler(req))
            return await self.model_work(req, route, params)
        except ApiError as exc:
            if exc.status in (429, 503) and not getattr(exc, "held", False):
                await self.hold(req)
            if self.gone(req, exc.reason):
                return None
            headers = {"Allow": exc.extra.pop("allow")} if "allow" in exc.extra else None
            return self.error(req, exc.status, exc.message, headers, **exc.extra)
        except ClientGone:
            metrics.reject(req.endpoint, "client_closed")
            return None
        except Overloaded as exc:
            await self.hold(req)
            if self.gone(req, "overloaded"):
                return None
            return self.error(req, 503, f"{exc}; retry shortly")
        except TimeoutError:
            if self.gone(req, "timeout"):
                return None
            return self.error(req, 504, f"the request did not finish within {self.settings.request_timeout_s:g} s")
        except NotServed as exc:
            if self.gone(req, "not_served"):
                return None
            return self.error(req, 404, str(exc))
        except Exception:
            log.exception("unexpected error in %s", req.endpoint)
            metrics.reject(req.endpoint, "internal")
            return self.error(req, 500, "internal error; the server log has the details")

    @staticmethod
    def gone(req: Request, reason: str) -> bool:
        """Count a rejection; True when its client has already hung up. An error nobody will
        read (shed, timed out, ... after the client left) is counted as client_closed (499)
        and is never a 5xx: the outcome was the hang-up."""
        if req.hung_up():
            metrics.reject(req.endpoint, "client_closed")
            return True
        metrics.reject(req.endpoint, reason)
        return False

    async def model_work(self, req: Request, route: Route, params: dict | None) -> Response:
        core, s = self.core, self.settings
        if core is None or not core.ready:
            raise ApiError(503, "deepserve is starting: models are not loaded yet", "not_ready")
        self.check_api_key(req)
        if len(self.slots.waiters) >= s.max_concurrency:
            # as many already wait for a slot as can run: shed before reading the body
            raise ApiError(
                503, f"deepserve is at capacity ({s.max_concurrency} requests in flight); retry shortly", "at_capacity"
            )
        try:
            async with asyncio.timeout(s.request_timeout_s):
                return await (route.handler(req, **params) if params else route.handler(req))
        finally:
            if req.cancelled.is_set() or not req.alive():
                req.cancelled.set()

    @contextlib.asynccontextmanager
    async def work(self, req: Request):
        """A slot of model work (DEEPSERVE_MAX_CONCURRENCY per worker), taken once the body
        has arrived. At capacity, a request waits for one to free up (first come, first served)
        until DEEPSERVE_SHED_HOLD_MS after it arrived, and is answered 503 only then: under
        overload the slots pass straight from one request to the next, and a client that
        resends at once costs one rejection per hold, not one per round trip. The hold counts
        from arrival, as `hold` does: a wait from the body's arrival added the body's time to
        every such 503 (p95 1.0 s against 0.75 s served, when a busy loop read bodies slowly)."""
        if not await self.slots.acquire(self._hold - (time.perf_counter() - req.start)):
            exc = ApiError(
                503,
                f"deepserve is at capacity ({self.settings.max_concurrency} requests in flight); retry shortly",
                "at_capacity",
            )
            exc.held = True
            raise exc
        try:
            yield
        finally:
            self.slots.release()

    @property
    def in_flight(self) -> int:
        return self.slots.taken

    def _flush(self) -> None:
        self._flusher = None
        metrics.aggregate.flush()

    def check_api_key(self, req: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        given = req.header("x-api-key").strip()
        auth = req.header("authorization")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "unauthorized")

    async def hold(self, req: Request) -> None:
        """Hold an overload answer until the hold has passed since the request arrived: a
        client that retries at once then costs one rejection per hold instead of spinning the
        CPU on them. A request that already waited (for a slot, then shed by the batcher) is
        not held a second time: such 503s took two holds (p95 0.75 s against 0.5 s served)."""
        if self._hold:
            left = self._hold - (time.perf_counter() - req.start)
            if left > 0:
                await asyncio.sleep(left)

    def error(self, req: Request, status: int, message: str, headers: dict | None = None, **extra) -> Response:
        headers = dict(headers or {})
        if status in (429, 503):
            headers["Retry-After"] = "1"
        return json_response({"error": message, "status": status, "request_id": req.id, **extra}, status, headers)

    # -------------------------------------------------------------- sending

    async def send(self, req: Request, resp: Response, send) -> None:
        headers = [
            (b"content-type", resp.media_type.encode()),
            (b"content-length", str(len(resp.body)).encode()),
            (b"x-request-id", req.id.encode()),
        ]
        if resp.headers:
            headers += resp.headers
        if req.trace is not None:
            version, trace_id, _, flags = req.trace
            span_id = f"{req.span.get_span_context().span_id:016x}" if req.span is not None else new_id()
            headers.append((b"traceparent", f"{version}-{trace_id}-{span_id}-{flags}".encode()))
        total = time.perf_counter() - req.start
        if req.timings and self.settings.server_timing:
            req.timings["total"] = total
            headers.append(
                (b"server-timing", ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in req.timings.items()).encode())
            )
        if (self.drain is not None and self.drain.draining) or resp.status in (408, 413):
            # draining: a pooled client then opens its next connection elsewhere; 408/413:
            # the rest of the body was never read, so this connection cannot carry another
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if req.method == "HEAD" else resp.body})
        self.record(req, resp.status, total)

    def record(self, req: Request, status: int, total: float | None = None) -> None:
        if req.span is not None:
            tracing.end_request(req, status)
        agg, code = metrics.aggregate, str(status)
        total = time.perf_counter() - req.start if total is None else total
        agg.inc("requests", (req.endpoint, code))
        agg.observe("duration", (req.endpoint, code), total)
        if req.timings and status < 400 and self.settings.server_timing:
            agg.stages(req.endpoint, req.timings)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(FLUSH_S, self._flush)
        if self.settings.access_log:
            log.info("%s %s %d %.1f ms", req.method, req.endpoint, status, total * 1000)


def build_app(core: Core | None = None, settings: Settings | None = None, fallback=None, drain=None):
    """deepserve's ASGI app for a core (in-process tests use it with Starlette's TestClient);
    wrapped in CORS when origins are configured."""
    settings = settings or (core.settings if core is not None else Settings())
    app = App(settings, core, fallback, drain)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if not origins:
        return app
    cors = CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
        expose_headers=["X-Request-ID", "Server-Timing", "X-Seed", "X-Digits", "X-Model-Version", "X-Model-Input"],
    )
    cors.deepserve = app  # so the service can bind the core to the inner app
    return cors


__all__ = ["App", "Request", "Response", "Route", "build_app", "json_response", "parse_json", "tasks"]
