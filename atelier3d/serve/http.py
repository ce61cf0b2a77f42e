"""What every ``/v1`` router shares: the error shape and who the client is."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier3d.api.common import ErrorResponse
from atelier3d.config import AppConfig
from atelier3d.errors import ApiError, Unavailable, UnsupportedMediaType, validation_message
from atelier3d.serve.faults import REPLICA_LOST, RETRY_AFTER_S, describe

logger = logging.getLogger("ray.serve")

ERRORS = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request"}


def error_response(status: int, code: str, message: str, retry_after_s: float | None = None):
    # Whole seconds, at least 1: a "Retry-After: 0" invites the client to hammer at once.
    headers = ({"Retry-After": str(max(1, math.ceil(retry_after_s)))}
               if retry_after_s is not None else None)
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


UPLOAD_PATHS = ("/v1/sessions", "/v1/jobs/mesh")  # image uploads; every other body is JSON


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413 while they stream in, before parsing.

    Uploads get ``max_upload_bytes`` (plus multipart overhead); every other body gets
    ``max_json_bytes``. Chunked bodies without a Content-Length are counted too.
    """

    def __init__(self, app: ASGIApp, config: AppConfig) -> None:
        self.app = app
        self.upload_limit = config.limits.max_upload_bytes + 64 * 1024
        self.json_limit = config.limits.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_PATHS
        limit = self.upload_limit if is_upload else self.json_limit
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(413, "payload_too_large", f"request body over {limit} bytes")
        await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # A bug, never bad input (that is a 4xx above): logged with its traceback, and answered
        # in the API's error shape rather than Starlette's plain-text 500.
        logger.error("unhandled error on %s %s", request.method, request.url.path,
                     exc_info=exc)
        return error_response(500, "internal", f"internal server error ({type(exc).__name__})")
