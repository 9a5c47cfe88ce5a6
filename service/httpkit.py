"""The HTTP kit at the bottom of the front door: what a handler answers (`Response`,
`json_response`), what a route is (`Route`), and strict JSON. It imports nothing of the
application, so the endpoint modules (service.routes, service.v2, service.admin) import it at
the top and service.app, which assembles them, sits above all of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from service.errors import ApiError


@dataclass
class Response:
    status: int
    body: bytes
    media_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] | None = None


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload)
    return Response(
        status, body, "application/json", [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    )


Handler = Callable[..., Awaitable[Response]]  # (service.app.Request, **path parameters) -> Response


@dataclass
class Route:
    endpoint: str  # the metric label: the route template
    methods: tuple[str, ...]
    handler: Handler
    model_work: bool = False  # under the API key, the concurrency limit and the request timeout


def parse_json(body: bytes) -> Any:
    """Strict JSON (no NaN or Infinity, integers within 64 bits, nesting within 1024 levels)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {str(exc)[:80]}", "bad_json") from None
