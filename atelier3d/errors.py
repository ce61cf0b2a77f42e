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
    """Input that cannot work as sent: an undecodable image, a point outside it, a
    malformed mask."""

    status, code = 400, "bad_request"


class NotFound(ApiError):
    """An id this client cannot see: unknown, expired, or another API key's."""

    status, code = 404, "not_found"


class Conflict(ApiError):
    """A request the resource's state does not allow yet (refine an empty object), or an
    idempotency key reused with another request."""

    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    """Over a size limit of ``limits.*`` (bytes, pixels, points)."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    """A body whose type is not one the route reads (sniffed, never trusted from
    the name or header)."""

    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    """Well-formed but invalid values (a request model's validation)."""

    status, code = 422, "invalid_request"


class TooManyRequests(ApiError):
    """Over a fair-use rate or a quota; ``retry_after_s`` says when to come back."""

    status, code = 429, "too_many_requests"


class Unavailable(ApiError):
    """A model or queue that cannot take the request now (back-pressure, a lost replica,
    an encode still running); retryable."""

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
