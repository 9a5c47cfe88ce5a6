"""The error contract: every client error is an ApiError with a status, a message the client
can act on, and a metrics reason from a fixed set. Messages never echo unbounded input."""

from __future__ import annotations

ECHO = 40  # at most this many characters of anything a client sent appear in a message


class ApiError(Exception):
    """A client error: HTTP status, a message the client can act on, a metrics reason."""

    def __init__(self, status: int, message: str, reason: str, **extra):
        super().__init__(message)
        self.status, self.message, self.reason, self.extra = status, message, reason, extra


class ClientGone(Exception):
    """The client closed the connection: nothing can be answered, and no more work is done."""


def shown(value, limit: int = ECHO) -> str:
    """repr() of a client value, cut to `limit` characters (an ellipsis marks the cut)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit + 2 else text[:limit] + "…"


def int_field(value, name: str, lo: int, hi: int, default: int | None = None) -> int:
    """A JSON or form value that must be an integer in [lo, hi] (booleans are not integers)."""
    if value is None:
        if default is None:
            raise ApiError(400, f"{name} is required", "missing_field")
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(400, f"{name} must be an integer, got {shown(value)}", "bad_field") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {type(value).__name__}", "bad_field")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {shown(value, 24)}", "out_of_range")
    return value


def bool_field(value, name: str, default: bool = False) -> bool:
    """true/false as JSON booleans, or as form strings (true/false/1/0)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise ApiError(400, f"{name} must be true or false, got {shown(value)}", "bad_field")


def str_field(value, name: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", "bad_field")
    return value
