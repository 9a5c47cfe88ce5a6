"""Graceful drain on SIGTERM, in each BentoML worker, keep-alive clients included.

Uvicorn, on SIGTERM, closes the listening socket at once: requests that are still in the
kernel's accept queue (sent by clients, not yet picked up by a busy worker) are reset, and
idle keep-alive connections are closed under clients that may be writing on them. Before
handing SIGTERM on, deepserve turns /readyz to 503 (load balancers stop routing), answers
every response with `Connection: close` (a pooled client then opens its next connection
elsewhere, or finds the port closed: not sent, nothing lost), and keeps serving until no
request is being handled, the accept queue is empty and no connection is mid-request; then
it lets uvicorn close the socket and finish as usual. The drain is bounded by the request
timeout. The same worker also applies the keep-alive and graceful-shutdown timeouts to
uvicorn, and exits (draining first) when its supervisor is gone (service.versions).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct
import sys
import time

from service import compat

log = logging.getLogger("deepserve")
QUIET_S = 0.25  # defaults of settings.drain_quiet_s and drain_fresh_connection_s (no app: unit use)
FRESH_S = 1.0


def listening_fd() -> int | None:
    """The socket BentoML hands its worker (`--fd N` on the worker's command line)."""
    try:
        return int(sys.argv[sys.argv.index("--fd") + 1])
    except (ValueError, IndexError):
        return None


def accept_queue(fd: int | None) -> int:
    """Connections waiting in the kernel's accept queue (Linux TCP_INFO: tcpi_unacked on a
    listening socket); 0 where that cannot be read. The fd is borrowed, never closed here."""
    if fd is None or not hasattr(socket, "TCP_INFO"):
        return 0
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("<8B5I", info)[12]
    except OSError:
        return 0
    finally:
        sock.detach()


def busy_connections(server, first_seen: dict | None = None, fresh_s: float = FRESH_S) -> int:
    """uvicorn connections with a request in progress (idle keep-alive ones are not busy).
    A connection accepted but with no request parsed yet is almost always a client that has
    just reconnected (after a `Connection: close`) and is writing one: uvicorn would close it
    under that request, so it counts as busy for its first `fresh_s` seconds (`first_seen`
    remembers when each was first seen)."""
    if server is None:
        return 0
    busy, now = 0, time.monotonic()
    for conn, complete in compat.connections(server):
        if complete is None:
            if first_seen is not None and now - first_seen.setdefault(conn, now) < fresh_s:
                busy += 1
        elif not complete:
            busy += 1
    return busy


class Drain:
    """Knows whether the worker is draining and runs the drain when SIGTERM arrives."""

    def __init__(self, max_seconds: float, app=None):
        self.max_seconds, self.app, self.draining = max_seconds, app, False
        self.server = None  # uvicorn.Server, found through its SIGTERM handler
        self._fd = listening_fd()
        self._handler = None

    @property
    def in_flight(self) -> int:
        return self.app.handling if self.app is not None else 0

    def install(self) -> None:
        """Wrap the SIGTERM handler uvicorn installed (call from the running event loop)."""
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return
        self.server = compat.uvicorn_server(previous)
        self._apply_timeouts()

        def on_term(sig, frame):
            if self.draining:
                return
            self.draining = True
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then(previous, sig, frame)))

        self._handler = on_term
        signal.signal(signal.SIGTERM, on_term)

    def _apply_timeouts(self) -> None:
        """Keep-alive longer than common clients' idle expiry (httpx: 5 s) and load
        balancers' (60 s), so the server is never the side that closes a connection a client
        is about to reuse; a bounded wait for stragglers after the drain."""
        settings = getattr(self.app, "settings", None)
        if self.server is not None and settings is not None:
            compat.set_uvicorn_timeouts(self.server, settings.keep_alive_s, settings.graceful_shutdown_s)

    def start(self) -> None:
        """Drain as if SIGTERM had arrived (used when the supervisor is gone)."""
        if self._handler is not None:
            self._handler(signal.SIGTERM, None)

    async def _drain_then(self, previous, sig, frame) -> None:
        start = time.monotonic()
        deadline, quiet_since, first_seen = start + self.max_seconds, None, {}
        settings = getattr(self.app, "settings", None)
        quiet_s = getattr(settings, "drain_quiet_s", QUIET_S)
        fresh_s = getattr(settings, "drain_fresh_connection_s", FRESH_S)
        log.info("SIGTERM: draining (%d in flight, %d queued)", self.in_flight, accept_queue(self._fd))
        while time.monotonic() < deadline:
            idle = self.in_flight == 0 and accept_queue(self._fd) == 0
            if idle and busy_connections(self.server, first_seen, fresh_s) == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet_s:
                    break
            else:
                quiet_since = None
            await asyncio.sleep(0.01)
        log.info("drained in %.2f s; shutting down", time.monotonic() - start)
        previous(sig, frame)
