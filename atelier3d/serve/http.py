"""What every ``/v1`` router shares: the error shape and who the client is."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray.serve.exceptions import BackPressureError

from atelier3d.errors import Unavailable, UnsupportedMediaType
from atelier3d.serve.faults import REPLICA_LOST, RETRY_AFTER_S, describe
from atelier3d.serve.schemas import ErrorResponse

ERRORS = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request"}


def error_response(status: int, code: str, message: str, retry_after_s: float | None = None):
    headers = {"Retry-After": str(int(retry_after_s + 0.999))} if retry_after_s else None
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/*+json``, whatever the parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def require_json(request: Request) -> None:
    """415 for a body declared as something other than JSON (a form, text). Without any
    Content-Type, FastAPI does not read the body as JSON either: its 422 says so."""
    content_type = request.headers.get("content-type")
    if content_type is not None and request.headers.get("content-length") != "0" \
            and not is_json(content_type):
        raise UnsupportedMediaType(
            f"this route takes a JSON body (Content-Type: application/json), not "
            f"{content_type.split(';', 1)[0][:100]!r}")


class ApiRoute(APIRoute):
    """Turns a model deployment's back-pressure, or a lost replica, into our 503 + Retry-After,
    and refuses bodies that are not JSON on the routes that take a JSON body (415, rather than
    FastAPI's 422 for a form, or a 400 whose message says nothing of the content type).

    When a deployment's queue (``max_queued_requests``) is full, its handle raises
    ``BackPressureError`` in the Gateway. Ray Serve installs its own handler for it on the
    ingress app, which answers plain text; caught here, inside the route, it becomes an
    ``Unavailable`` with the deployment's ``backpressure_config`` Retry-After, in our shape.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_json = self.body_field is not None

        async def route(request: Request) -> Response:
            if takes_json:
                require_json(request)
            try:
                return await handler(request)
            except BackPressureError as exc:
                retry_after = exc.retry_after_s if exc.retry_after_s is not None else 1.0
                message = f"the server is busy, retry shortly ({exc.message.rstrip('.')})"
                raise Unavailable(message, retry_after_s=retry_after) from exc
            except REPLICA_LOST as exc:  # where a route has no retry of its own
                raise Unavailable(f"a model replica was lost ({describe(exc)}); retry shortly",
                                  retry_after_s=RETRY_AFTER_S) from exc

        return route


def client_key(request: Request) -> str:
    """Who the client is: its API key's identity when keys are on, else its address as
    ``FairUseMiddleware`` named it (the proxy's X-Forwarded-For where trusted)."""
    from atelier3d.serve.auth import SCOPE_KEY

    identity = request.scope.get(SCOPE_KEY) or getattr(request.state, "client", None)
    if identity:
        return identity
    return request.client.host if request.client else "unknown"
