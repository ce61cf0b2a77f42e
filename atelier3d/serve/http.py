"""What every ``/v1`` router shares: the error shape and who the client is."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from atelier3d.serve.schemas import ErrorResponse

ERRORS = {
    status: {"model": ErrorResponse}
    for status in (400, 404, 409, 413, 415, 422, 429, 503)
}
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request"}


def error_response(status: int, code: str, message: str, retry_after_s: float | None = None):
    headers = {"Retry-After": str(int(retry_after_s + 0.999))} if retry_after_s else None
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def client_key(request: Request) -> str:
    return request.client.host if request.client else "unknown"
