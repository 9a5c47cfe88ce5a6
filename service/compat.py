"""Every use of a library's internals, in one place: BentoML (pinned 1.4.39), prometheus-client
(0.26.0) and uvicorn (0.54.0), as pyproject.toml pins them.

Each function here reads or changes something its library does not publish as API;
tests/unit/test_compat.py checks each one against the installed library and names the library
and its pinned version when it breaks, so an upgrade fails there first, not in production.
BentoML's internals are imported inside the functions that need them: importing service.compat
costs nothing until one is used (`bentoml._internal` pulls in BentoML's configuration).
"""

from __future__ import annotations

import importlib
import select
from collections.abc import Callable
from pathlib import Path
from typing import Any

PINNED_BENTOML = "1.4.39"
PINNED_PROMETHEUS_CLIENT = "0.26.0"
PINNED_UVICORN = "0.54.0"
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # the peer shut its side down (Linux)

# exporter_type -> protocol -> the module BentoML imports in each worker
# (bentoml/_internal/configuration/containers.py, tracer_provider)
EXPORTERS = {
    "otlp": {
        "http": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    },
    "jaeger": {
        "thrift": "opentelemetry.exporter.jaeger.thrift",
        "grpc": "opentelemetry.exporter.jaeger.proto.grpc",
    },
    "zipkin": {None: "opentelemetry.exporter.zipkin.json"},
}


def service_overrides(name: str) -> dict[str, Any]:
    """The per-service configuration a user gave BentoML (BENTOML_CONFIG file or
    BENTOML_CONFIG_OPTIONS: `services.<name>.…`), as BentoML's container holds it."""
    from bentoml._internal.configuration.containers import BentoMLContainer  # on use: BentoML's configuration

    try:
        services = BentoMLContainer.config.services.get() or {}
    except KeyError:  # no per-service configuration given at all
        return {}
    return dict(services.get(name) or {})


def tracing_config(name: str, declared: dict[str, Any]) -> dict[str, Any]:
    """The tracing settings a worker of service `name` will use: the decorator's, overridden by
    the user's BentoML configuration."""
    return {**(declared or {}), **(service_overrides(name).get("tracing") or {})}


def tracing_problem(cfg: dict[str, Any]) -> str | None:
    """Why BentoML's workers would fail to set up this tracing configuration (None: they won't).
    Checked in the server process, so a bad configuration stops start-up with one line instead
    of a worker crash loop behind an open port."""
    kind = cfg.get("exporter_type")
    if not kind or kind in ("in_memory", "console"):
        return None
    if kind not in EXPORTERS:
        return f"tracing.exporter_type {kind!r} is not one of {', '.join(EXPORTERS)}"
    options = cfg.get(kind) or {}
    protocol = options.get("protocol") if kind != "zipkin" else None
    if protocol not in EXPORTERS[kind]:
        return f"tracing.{kind}.protocol {protocol!r} is not one of {', '.join(map(str, EXPORTERS[kind]))}"
    if kind == "otlp" and not options.get("endpoint"):
        return "tracing.otlp.endpoint is not set"
    module = EXPORTERS[kind][protocol]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        extra = "tracing-otlp" if kind == "otlp" else f"tracing-{kind}"
        return (
            f"tracing.exporter_type {kind} needs {module}, which is not installed ({exc}); "
            f"install BentoML's extra: pip install 'bentoml[{extra}]=={PINNED_BENTOML}'"
        )
    return None


def tracer_provider():
    """BentoML's tracer provider for this worker when its tracing configuration names an
    exporter (its sampler and exporter, as the user configured them), else None: with no
    exporter deepserve creates no span objects at all (BentoML's provider would still sample
    and record spans it never exports, so a low sample rate is not "off")."""
    from bentoml._internal.configuration.containers import BentoMLContainer  # on use: BentoML's configuration

    try:
        kind = BentoMLContainer.config.tracing.exporter_type.get()
    except (KeyError, AttributeError):
        return None
    if kind not in EXPORTERS and kind not in ("in_memory", "console"):
        return None
    return BentoMLContainer.tracer_provider.get()


# --------------------------------------------------------------------------- BentoML


def put_in_front(service, front, behind: Callable[[Any], None]) -> None:
    """Make `front` the ASGI app of each worker of the BentoML service `service` (what
    `bentoml.service` made of a class): BentoML's worker calls `service.to_asgi()`; the
    service's class is swapped for a subclass whose `to_asgi` hands BentoML's own app to
    `behind` (probes, /metrics, lifespan) and answers `front`."""

    class FrontDoorService(type(service)):
        __slots__ = ()  # BentoML's Service is a slotted attrs class

        def to_asgi(self, is_main: bool = True):
            behind(super().to_asgi(is_main))
            return front

    service.__class__ = FrontDoorService


def swagger_static_dir() -> Path | None:
    """The folder of Swagger UI files inside BentoML's package (served under /static/swagger/
    so the docs page makes no third-party request); None where BentoML has none."""
    try:
        import bentoml._internal.server as bentoml_server  # on use (module docstring)
    except ImportError:
        return None
    folder = Path(bentoml_server.__file__).parent / "static_content"
    return folder if folder.is_dir() else None


def worker_index() -> str:
    """BentoML's worker index (1, 2, ...) in a worker; "0" outside a server."""
    try:
        from bentoml._internal.context import server_context  # on use (module docstring)

        return str(server_context.worker_index or 0)
    except Exception:
        return "0"


# --------------------------------------------------------------------------- prometheus-client


def histogram_add(child, total: float, counts: list[int]) -> None:
    """Add many observations to one labelled histogram at once: their sum, and how many fell
    in each bucket (not cumulative, as prometheus_client keeps them: `_sum` and `_buckets`,
    which `observe()` increments one observation at a time)."""
    child._sum.inc(total)
    for bucket, n in zip(child._buckets, counts):
        if n:
            bucket.inc(n)


# --------------------------------------------------------------------------- uvicorn


def disconnect_probe(receive) -> Callable[[], bool] | None:
    """A function telling whether the client of this ASGI request has hung up (uvicorn's
    RequestResponseCycle, whose bound `receive` this is, keeps `disconnected`); None under a
    server that does not say (a test client)."""
    cycle = getattr(receive, "__self__", None)
    if not hasattr(cycle, "disconnected"):
        return None
    return lambda: cycle.disconnected


def peer_closed(receive) -> bool:
    """Whether the kernel already holds the client's hang-up (FIN or RST) on this request's
    connection, read or not: an event loop that was busy runs a timer that fell due before it
    polls its sockets (uvloop does), so `disconnected` can lag a hang-up by as long as the
    loop was blocked. One poll(2) of the socket, for answers that follow a wait."""
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return False
    if transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), POLLRDHUP)  # POLLHUP and POLLERR (a reset) are always reported
    return bool(poller.poll(0))


def uvicorn_server(sigterm_handler):
    """The uvicorn.Server whose SIGTERM handler (its bound `handle_exit`) this is, else None."""
    server = getattr(sigterm_handler, "__self__", None)
    return server if hasattr(server, "server_state") and hasattr(server, "config") else None


def set_uvicorn_timeouts(server, keep_alive_s: float, graceful_shutdown_s: float) -> None:
    """Keep-alive and graceful-shutdown timeouts of a running uvicorn server (its config is
    read per connection and at shutdown, so a change applies from here on)."""
    server.config.timeout_keep_alive = keep_alive_s
    server.config.timeout_graceful_shutdown = graceful_shutdown_s


def connections(server) -> list[tuple[int, bool | None]]:
    """The server's open connections, each as (its id, whether its current response is
    complete: None when no request has been parsed on it yet)."""
    out = []
    for conn in list(getattr(getattr(server, "server_state", None), "connections", ())):
        cycle = getattr(conn, "cycle", None)
        out.append((id(conn), None if cycle is None else cycle.response_complete))
    return out
