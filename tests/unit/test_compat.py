"""The library internals deepserve uses (service/compat.py: BentoML, prometheus-client, uvicorn),
checked against the installed libraries: when one of these fails after an upgrade, the message
names the library and its pinned version."""

from __future__ import annotations

import asyncio
import bisect
import importlib.metadata
import importlib.util
import socket
import threading
import time
from pathlib import Path

import bentoml
import pytest

from service import compat
from service.routes import SWAGGER

PIN = f"(written against bentoml=={compat.PINNED_BENTOML}; installed {bentoml.__version__})"


def test_the_pin_is_the_installed_bentoml():
    assert bentoml.__version__ == compat.PINNED_BENTOML, PIN


def test_the_exporter_table_is_what_bentoml_imports_in_its_workers():
    from bentoml._internal.configuration import containers

    source = Path(containers.__file__).read_text()
    for kind, protocols in compat.EXPORTERS.items():
        assert f'tracer_type == "{kind}"' in source, f"BentoML no longer has exporter {kind} {PIN}"
        for module in protocols.values():
            package, _, name = module.rpartition(".")
            assert f"from {package} import {name}" in source or f"from {module} import" in source, (
                f"BentoML no longer imports {module} for {kind} {PIN}"
            )


def test_service_overrides_reads_bentoml_s_per_service_configuration(monkeypatch):
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert hasattr(BentoMLContainer.config, "services"), f"BentoMLContainer.config.services is gone {PIN}"
    assert isinstance(compat.service_overrides("deepserve"), dict)


def test_tracing_problems_are_named():
    assert compat.tracing_problem({}) is None
    assert compat.tracing_problem({"exporter_type": "in_memory"}) is None
    assert "not one of" in compat.tracing_problem({"exporter_type": "carrier-pigeon"})
    assert "protocol" in compat.tracing_problem({"exporter_type": "otlp", "otlp": {}})
    assert "endpoint" in compat.tracing_problem({"exporter_type": "otlp", "otlp": {"protocol": "http"}})


# --------------------------------------------------------------------------- BentoML: the front door, static files, worker index


def test_the_front_door_replaces_the_worker_app_bentoml_builds():
    worker = Path(importlib.util.find_spec("_bentoml_impl.worker.service").origin).read_text()
    assert "service.to_asgi(" in worker, f"BentoML's worker no longer builds its app with Service.to_asgi {PIN}"

    @bentoml.service(name="compat-probe")
    class Probe:
        @bentoml.api
        def hello(self) -> str:
            return "hi"

    front, behind = object(), []
    compat.put_in_front(Probe, front, behind.append)
    assert Probe.to_asgi() is front, f"Service.to_asgi is no longer what the worker serves {PIN}"
    assert len(behind) == 1 and callable(behind[0]), f"BentoML's own app did not reach the front door {PIN}"


def test_swagger_ui_files_are_where_bentoml_ships_them():
    folder = compat.swagger_static_dir()
    assert folder is not None, f"bentoml/_internal/server/static_content is gone {PIN}"
    missing = [n for n in SWAGGER if not (folder / n).is_file()]
    assert not missing, f"BentoML no longer ships {missing} in {folder} {PIN}"


def test_the_worker_index_is_read_from_bentoml_s_server_context():
    from bentoml._internal.context import server_context

    assert hasattr(server_context, "worker_index"), f"server_context.worker_index is gone {PIN}"
    before = server_context.worker_index
    try:
        server_context.worker_index = 3
        assert compat.worker_index() == "3"
        server_context.worker_index = None
        assert compat.worker_index() == "0"
    finally:
        server_context.worker_index = before


# --------------------------------------------------------------------------- prometheus-client: histogram writes

PROM = (
    f"(written against prometheus-client=={compat.PINNED_PROMETHEUS_CLIENT}; "
    f"installed {importlib.metadata.version('prometheus-client')})"
)


def test_the_prometheus_client_pin_is_the_installed_one():
    assert importlib.metadata.version("prometheus-client") == compat.PINNED_PROMETHEUS_CLIENT, PROM


def test_adding_many_observations_at_once_equals_observing_each():
    import prometheus_client as prom

    registry, bounds = prom.CollectorRegistry(), (0.1, 0.5, 1.0)
    one = prom.Histogram("one_by_one", "", ["m"], buckets=bounds, registry=registry)
    many = prom.Histogram("all_at_once", "", ["m"], buckets=bounds, registry=registry)
    values = [0.05, 0.1, 0.3, 0.7, 0.7, 2.0, 9.0]
    for v in values:
        one.labels("x").observe(v)
    counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative, the last one +Inf
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    child = many.labels("x")
    assert hasattr(child, "_sum") and hasattr(child, "_buckets"), f"Histogram._sum/_buckets are gone {PROM}"
    compat.histogram_add(child, sum(values), counts)
    for le in ("0.1", "0.5", "1.0", "+Inf"):
        got = registry.get_sample_value("all_at_once_bucket", {"m": "x", "le": le})
        assert got == registry.get_sample_value("one_by_one_bucket", {"m": "x", "le": le}), f"le={le} {PROM}"
    assert registry.get_sample_value("all_at_once_sum", {"m": "x"}) == pytest.approx(sum(values))
    assert registry.get_sample_value("all_at_once_count", {"m": "x"}) == len(values)


# --------------------------------------------------------------------------- uvicorn: connection state

UVICORN = f"(written against uvicorn=={compat.PINNED_UVICORN}; installed {importlib.metadata.version('uvicorn')})"


def test_the_uvicorn_pin_is_the_installed_one():
    assert importlib.metadata.version("uvicorn") == compat.PINNED_UVICORN, UVICORN


def until(check, what: str, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} within {seconds} s {UVICORN}")


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_connection_state_and_hang_ups_are_read_from_a_real_uvicorn(http):
    import uvicorn

    release, probes, receives = threading.Event(), [], []
    arrived, client_gone, seen = threading.Event(), threading.Event(), []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        probes.append(compat.disconnect_probe(receive))
        receives.append(receive)
        if scope["path"] == "/block":  # the loop is blocked while the client hangs up
            arrived.set()
            client_gone.wait(5)
            time.sleep(0.05)  # the FIN has reached the kernel; the loop has not polled since
            seen.append((probes[-1](), compat.peer_closed(receive)))
            return
        while not release.is_set() and not probes[-1]():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=http, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        until(lambda: server.started, "uvicorn did not start")
        assert compat.uvicorn_server(server.handle_exit) is server, f"handle_exit is not uvicorn.Server's {UVICORN}"
        compat.set_uvicorn_timeouts(server, 75.0, 3.0)
        assert (server.config.timeout_keep_alive, server.config.timeout_graceful_shutdown) == (75.0, 3.0)

        client = socket.create_connection(sock.getsockname())
        assert until(lambda: compat.connections(server), "the connection is not in server_state.connections")
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        until(lambda: probes, "the request did not arrive")
        assert probes[0] is not None, f"receive is no longer bound to a cycle with `disconnected` {UVICORN}"
        assert not probes[0]() and not compat.peer_closed(receives[0]), "a live client is not hung up"
        until(lambda: [c for _, c in compat.connections(server) if c is False], "a busy connection is not busy")
        release.set()
        assert client.recv(1024).startswith(b"HTTP/1.1 200")
        until(lambda: [c for _, c in compat.connections(server)] == [True], "an answered connection is not idle")
        client.close()

        release.clear()
        hung = socket.create_connection(sock.getsockname())
        hung.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        until(lambda: len(probes) == 2, "the second request did not arrive")
        hung.close()
        until(probes[1], "a client that hung up is not seen as disconnected")
        assert compat.peer_closed(receives[1])

        blocked = socket.create_connection(sock.getsockname())
        blocked.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
        assert arrived.wait(5), "the blocking request did not arrive"
        blocked.close()
        client_gone.set()
        until(lambda: seen, "the blocked app did not look")
        assert seen == [(False, True)], f"the kernel's hang-up is not seen through the socket {UVICORN}"
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def test_the_pins_here_are_pyproject_s():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for package, pin in (
        ("bentoml", compat.PINNED_BENTOML),
        ("prometheus-client", compat.PINNED_PROMETHEUS_CLIENT),
        ("uvicorn[standard]", compat.PINNED_UVICORN),
    ):
        assert f'"{package}=={pin}"' in pyproject, (
            f"pyproject.toml no longer pins {package}=={pin}: update service/compat.py"
        )
