"""Graceful drain on SIGTERM, in each BentoML worker.

Uvicorn, on SIGTERM, closes the listening socket at once: requests that are still in the
kernel's accept queue (sent by clients, not yet picked up by a busy worker) are reset, so a
client sees its request dropped. Before handing SIGTERM on, deepserve turns /readyz to 503
(load balancers stop routing), keeps serving until the accept queue is empty and no request is
in flight, then lets uvicorn close the socket and finish as usual. The drain is bounded by the
request timeout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct
import sys
import time

log = logging.getLogger("deepserve")
QUIET_S = 0.1  # the queue and the handlers must stay empty this long before we close


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


class Drain:
    """Counts requests in flight and runs the drain when SIGTERM arrives."""

    def __init__(self, max_seconds: float):
        self.max_seconds, self.in_flight, self.draining = max_seconds, 0, False
        self._fd = listening_fd()

    def install(self) -> None:
        """Wrap the SIGTERM handler uvicorn installed (call from the running event loop)."""
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return

        def on_term(sig, frame):
            if self.draining:
                return
            self.draining = True
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then(previous, sig, frame)))

        signal.signal(signal.SIGTERM, on_term)

    async def _drain_then(self, previous, sig, frame) -> None:
        start = time.monotonic()
        deadline, quiet_since = start + self.max_seconds, None
        log.info("SIGTERM: draining (%d in flight, %d queued)", self.in_flight, accept_queue(self._fd))
        while time.monotonic() < deadline:
            if self.in_flight == 0 and accept_queue(self._fd) == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= QUIET_S:
                    break
            else:
                quiet_since = None
            await asyncio.sleep(0.01)
        log.info("drained in %.2f s; shutting down", time.monotonic() - start)
        previous(sig, frame)
