"""Errors that cross the API boundary as ``{"error": {"code", "message"}}`` with a 4xx/503."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class TooManyRequests(ApiError):
    status, code = 429, "too_many_requests"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class EmbeddingLostError(RuntimeError):
    """Raised by the decoder when a session's embedding is gone from the object store."""


def validation_message(errors: Sequence[Mapping[str, Any]], prefix: str = "",
                       limit: int = 5) -> str:
    """pydantic's ``ValidationError.errors()`` (FastAPI's too) as one plain line for users:
    ``where: what`` for the first ``limit`` (``where`` without FastAPI's ``body`` root)."""
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return prefix + ("; ".join(parts) or "invalid request")
