"""The BentoML service: `bentoml serve service.service:DeepServe`.

BentoML owns the process model (workers, graceful shutdown), /livez /healthz /readyz
/metrics, traffic limits and packaging; deepserve's routes are a Starlette app mounted
inside it (`@bentoml.asgi_app`), batching on BentoML's adaptive batcher (service.core).
Settings are read and validated here, once, because BentoML needs them when the class
is declared.
"""

from __future__ import annotations

import logging

import bentoml
from pydantic import ValidationError

from service.api import JsonNotFound, app
from service.drain import Drain
from service.runtime import ModelLoadError, load_registry
from service.settings import Settings

MODEL_ROUTES = ["/classify", "/generate", "/compress", "/decompress", "/denoise", "/models"]

try:
    settings = Settings()
    # Fail fast in the server process, before BentoML spawns workers (it would respawn a
    # failing worker forever): every model must match its sha256 and load in ONNX Runtime.
    load_registry(settings.exported_dir, "cpu", 1)
except (ValidationError, ModelLoadError) as exc:
    raise SystemExit(f"deepserve cannot start: {exc}") from None
logging.getLogger("deepserve").setLevel(settings.log_level)

_cors = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]


@bentoml.service(
    name="deepserve",
    workers=settings.workers,
    # deepserve sheds past max_concurrency itself (503 + Retry-After, JSON contract), so
    # BentoML's own limit (a bare 429, one more middleware per request) is left off
    traffic={"timeout": settings.request_timeout_s + 5},
    # OpenTelemetry's per-request span costs more than a small model's inference here
    tracing={"excluded_urls": MODEL_ROUTES},
    logging={"access": {"enabled": settings.access_log}},
    http={"cors": {"enabled": bool(_cors), "access_control_allow_origins": _cors or None,
                   "access_control_allow_methods": ["GET", "POST"], "access_control_allow_headers": ["*"]}},  # fmt: skip
)
@bentoml.asgi_app(app, path="/")
class DeepServe:
    def __init__(self) -> None:
        from service.core import Core

        self.core = Core(settings)  # verified again here; serves nothing it could not verify
        self.drain = Drain(settings.request_timeout_s)
        app.state.core, app.state.drain = self.core, self.drain

    @bentoml.on_startup
    async def warm_up(self) -> None:
        self.drain.install()  # uvicorn's signal handlers are in place by now
        await self.core.warmup()

    @bentoml.on_shutdown
    def close(self) -> None:
        self.core.shutdown()

    def __is_ready__(self) -> bool:
        return self.core.ready and not self.drain.draining


DeepServe.add_asgi_middleware(JsonNotFound)
