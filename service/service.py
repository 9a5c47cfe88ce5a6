"""The BentoML service: `bentoml serve service.service:DeepServe`.

BentoML owns the process model (workers, restarts, graceful shutdown), /livez /healthz
/readyz /metrics and packaging. deepserve's front door (service.app) is the outermost ASGI
layer of each worker: it answers every deepserve route itself and passes BentoML's own
routes through to BentoML's app, so a model request crosses one layer, not BentoML's and
Starlette's middleware stacks, and every metric label stays within a fixed set.
Settings are read and validated here, once, because BentoML needs them when the class is
declared.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket

import bentoml
from pydantic import ValidationError

from service import metrics, tracing
from service.app import build_app
from service.compat import put_in_front, tracing_config, tracing_problem
from service.core import Core, load_all
from service.drain import Drain, listening_fd
from service.runtime import ModelLoadError, device_problem
from service.settings import Settings
from service.versions import Follower, StartGuard, watch_supervisor

log = logging.getLogger("deepserve")
PROBES = ["/livez", "/healthz", "/readyz", "/metrics"]

TRACING = {"excluded_urls": PROBES}  # spans come from BentoML's tracing configuration

try:
    settings = Settings()
    # Fail fast in the server process, before BentoML spawns workers (it would respawn a
    # failing worker forever): every model must match its sha256, load in ONNX Runtime and
    # fit its task; the manifest and every metadata file must be well-typed; key files are
    # read (Settings); the device asked for must be usable; BentoML's tracing configuration
    # must name an exporter whose package is installed.
    load_all(settings.exported_dir, "cpu", 1)
    problem = tracing_problem(tracing_config("deepserve", TRACING)) or device_problem(settings.device)
    if problem:
        raise ModelLoadError(problem)
except ValidationError as exc:  # one line, naming each setting: DEEPSERVE_<FIELD>
    shown = "; ".join(
        f"DEEPSERVE_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
    raise SystemExit(f"deepserve cannot start: {shown}") from None
except ModelLoadError as exc:
    raise SystemExit(f"deepserve cannot start: {exc}") from None
logging.getLogger("deepserve").setLevel(settings.log_level)
if listening_fd() is None:  # the `bentoml serve` process: its workers will know who started them
    os.environ["DEEPSERVE_SUPERVISOR_PID"] = str(os.getpid())
    StartGuard(settings.max_worker_starts, os.getpid()).succeeded()  # a fresh count (pids are reused)
else:  # a worker: count the start; a worker that keeps failing to start stops the server
    starts = StartGuard(settings.max_worker_starts)
    starts.begin()

front = build_app(settings=settings)  # the core is bound in each worker, below
app = getattr(front, "deepserve", front)


@bentoml.service(
    name="deepserve",
    workers=settings.workers,
    # deepserve applies its own request timeout, concurrency limit and CORS in the front
    # door; BentoML's timeout only wraps the probes it still serves
    traffic={"timeout": settings.request_timeout_s + 5},
    tracing=TRACING,
    logging={"access": {"enabled": False}},  # deepserve writes its own (DEEPSERVE_ACCESS_LOG)
)
class DeepServe:
    def __init__(self) -> None:
        tracing.setup()  # spans only when BentoML's tracing configuration names an exporter
        self.core = Core(settings)  # verified again here; serves nothing it could not verify
        self.drain = Drain(settings.request_timeout_s, app)
        app.bind(self.core, self.drain)
        warn_if_open(settings)

    @bentoml.on_startup
    async def warm_up(self) -> None:
        self.drain.install()  # uvicorn's signal handlers are in place by now
        await self.core.warmup()
        starts.succeeded()
        self.follower = app.follower = Follower(self.core, settings.manifest_poll_s)
        self.follower.start()  # every worker follows the manifest (new versions, rollbacks)
        self._watch = asyncio.get_running_loop().create_task(watch_supervisor(self.drain))

    @bentoml.on_shutdown
    def close(self) -> None:
        if getattr(self, "follower", None) is not None:
            self.follower.stop()
        self.core.shutdown()
        metrics.aggregate.flush()

    def __is_ready__(self) -> bool:
        return self.core.ready and not self.drain.draining


def _behind(bentoml_app) -> None:
    app.fallback = bentoml_app  # BentoML's app: probes, /metrics, lifespan


put_in_front(DeepServe, front, _behind)  # each worker's ASGI app is deepserve's front door


def warn_if_open(s: Settings, fd: int | None = None) -> bool:
    """Fail closed by default: say so loudly when the port (BentoML's listening socket, or
    `fd`) is reachable beyond loopback and no API key is set; True when it warned."""
    fd = listening_fd() if fd is None else fd
    if fd is None or s.api_key:
        return False
    try:
        sock = socket.socket(fileno=fd)
        try:
            host = sock.getsockname()[0]
        finally:
            sock.detach()
        if not ipaddress.ip_address(host).is_loopback:
            log.warning(
                "listening on %s with no API key: every model endpoint is open to anyone who can reach "
                "this port; set DEEPSERVE_API_KEY or DEEPSERVE_API_KEY_FILE",
                host,
            )
            return True
    except (OSError, ValueError):
        pass
    return False
