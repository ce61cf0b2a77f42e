"""What every ``/v1`` router shares: the error shape and who the client is."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray.serve.exceptions import BackPressureError

from atelier3d.errors import Unavailable
from atelier3d.serve.faults import REPLICA_LOST, RETRY_AFTER_S, describe
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


class ApiRoute(APIRoute):
    """Turns a model deployment's back-pressure, or a lost replica, into our 503 + Retry-After.

    When a deployment's queue (``max_queued_requests``) is full, its handle raises
    ``BackPressureError`` in the Gateway. Ray Serve installs its own handler for it on the
    ingress app, which answers plain text; caught here, inside the route, it becomes an
    ``Unavailable`` with the deployment's ``backpressure_config`` Retry-After, in our shape.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
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
    """The client as ``FairUseMiddleware`` named it (its address, or the proxy's
    X-Forwarded-For where trusted)."""
    named = getattr(request.state, "client", None)
    if named:
        return named
    return request.client.host if request.client else "unknown"
