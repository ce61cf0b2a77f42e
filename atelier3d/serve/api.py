"""The versioned HTTP API (``/v1``): FastAPI routes over the segmentation service."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier3d.config import AppConfig
from atelier3d.errors import ApiError, BadRequest
from atelier3d.serve.api_jobs import JobsApi, build_jobs_router
from atelier3d.serve.auth import ApiKeyMiddleware, KeyRing
from atelier3d.serve.fairuse import FairUse, FairUseMiddleware
from atelier3d.serve.http import ERRORS, HTTP_CODES, ApiRoute, client_key, error_response
from atelier3d.serve.parsing import ParsingService
from atelier3d.serve.schemas import (
    CutoutRequest,
    ObjectState,
    ParseRequest,
    ParseResponse,
    ReadyInfo,
    SegmentRequest,
    SegmentResponse,
    SelectRequest,
    SessionInfo,
)
from atelier3d.serve.segmentation import SegmentationService

logger = logging.getLogger("ray.serve")

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
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

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


def build_router(service: SegmentationService) -> APIRouter:
    router = APIRouter(prefix="/v1", responses=ERRORS, route_class=ApiRoute)

    @router.post("/sessions", status_code=201, response_model=SessionInfo,
                 summary="Upload an image (multipart field 'image', or the raw bytes)",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "multipart/form-data": {"schema": {
                         "type": "object", "required": ["image"],
                         "properties": {"image": {"type": "string", "format": "binary"}}}},
                     "application/octet-stream": {"schema": {"type": "string",
                                                             "format": "binary"}},
                     "image/png": {"schema": {"type": "string", "format": "binary"}},
                 }}})
    async def create_session(request: Request, wait: bool = False) -> SessionInfo:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise BadRequest("multipart upload needs a file field named 'image'")
            data = await upload.read()
        else:
            data = await request.body()
        info = await service.create_session(data, client_key(request))
        return await service.wait_ready(info.session_id) if wait else info

    @router.get("/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str) -> SessionInfo:
        return await service.get_session(session_id)

    @router.delete("/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str) -> Response:
        await service.delete_session(session_id)
        return Response(status_code=204)

    @router.post("/sessions/{session_id}/segment", response_model=SegmentResponse)
    async def segment(session_id: str, body: SegmentRequest) -> SegmentResponse:
        return await service.segment(session_id, body)

    @router.post("/sessions/{session_id}/cutout", response_class=Response,
                 responses={200: {"content": {"image/png": {}}}})
    async def cutout(session_id: str, body: CutoutRequest) -> Response:
        png = await service.cutout(session_id, body)
        return Response(content=png, media_type="image/png")

    @router.post("/sessions/{session_id}/objects", status_code=201, response_model=ObjectState)
    async def create_object(session_id: str) -> ObjectState:
        return await service.create_object(session_id)

    @router.get("/sessions/{session_id}/objects/{object_id}", response_model=ObjectState)
    async def get_object(session_id: str, object_id: str) -> ObjectState:
        return await service.get_object(session_id, object_id)

    @router.delete("/sessions/{session_id}/objects/{object_id}", status_code=204)
    async def delete_object(session_id: str, object_id: str) -> Response:
        await service.delete_object(session_id, object_id)
        return Response(status_code=204)

    @router.post("/sessions/{session_id}/objects/{object_id}/select", response_model=ObjectState)
    async def select(session_id: str, object_id: str, body: SelectRequest) -> ObjectState:
        return await service.select(session_id, object_id, body.index)

    for action in ("undo", "redo", "reset"):
        def make(action: str):
            async def edit(session_id: str, object_id: str) -> ObjectState:
                return await service.edit_object(session_id, object_id, action)

            edit.__name__ = action
            return edit

        router.add_api_route(
            f"/sessions/{{session_id}}/objects/{{object_id}}/{action}",
            make(action),
            methods=["POST"],
            response_model=ObjectState,
            summary=f"{action.capitalize()} the object's last step",
        )
    return router


PNG = {200: {"content": {"image/png": {}}}}


def build_parse_router(parsing: ParsingService) -> APIRouter:
    """Body and garment separation: ``POST .../parse``, then its results under ``.../parses``."""
    router = APIRouter(prefix="/v1/sessions/{session_id}", responses=ERRORS, tags=["parsing"],
                       route_class=ApiRoute)

    @router.post("/parse", response_model=ParseResponse,
                 summary="Parse the character (an object's mask, or an RLE) into body labels, "
                 "keypoints and garment cut-outs")
    async def parse(session_id: str, body: ParseRequest) -> ParseResponse:
        return await parsing.parse(session_id, body)

    @router.get("/parses/{parse_id}", response_model=ParseResponse)
    async def get_parse(session_id: str, parse_id: str) -> ParseResponse:
        return await parsing.get_parse(session_id, parse_id)

    async def asset(session_id: str, parse_id: str, kind: str, part: str | None = None):
        data, media_type = await parsing.asset(session_id, parse_id, kind, part)
        return Response(content=data, media_type=media_type)

    @router.get("/parses/{parse_id}/parse_map.png", response_class=Response, responses=PNG,
                summary="The label map in the ATR palette, image-sized")
    async def parse_map(session_id: str, parse_id: str) -> Response:
        return await asset(session_id, parse_id, "parse_map")

    @router.get("/parses/{parse_id}/pose_map.png", response_class=Response, responses=PNG,
                summary="OpenPose-style skeleton on black, image-sized")
    async def pose_map(session_id: str, parse_id: str) -> Response:
        return await asset(session_id, parse_id, "pose_map")

    @router.get("/parses/{parse_id}/parts.zip", response_class=Response,
                responses={200: {"content": {"application/zip": {}}}},
                summary="Every cut-out, completed versions and a parts.json manifest")
    async def parts_zip(session_id: str, parse_id: str) -> Response:
        return await asset(session_id, parse_id, "zip")

    @router.get("/parses/{parse_id}/parts/{name}.png", response_class=Response, responses=PNG,
                summary="One part's RGBA cut-out, cropped to its bbox")
    async def part(session_id: str, parse_id: str, name: str) -> Response:
        return await asset(session_id, parse_id, "part", name)

    @router.get("/parses/{parse_id}/parts/{name}/completed.png", response_class=Response,
                responses=PNG, summary="The cut-out with its occluded part filled in")
    async def completed(session_id: str, parse_id: str, name: str) -> Response:
        return await asset(session_id, parse_id, "completed", name)

    return router


def build_api(service: SegmentationService, config: AppConfig,
              parsing: ParsingService | None = None, jobs: JobsApi | None = None,
              fair_use: FairUse | None = None) -> FastAPI:
    app = FastAPI(
        title="atelier3d",
        version="1",
        description="Interactive segmentation (SAM) and body/garment separation served on "
        "Ray Serve. Errors are "
        '`{"error": {"code", "message"}}`.',
    )
    install_error_handlers(app)
    app.include_router(build_router(service))
    if parsing is not None:
        app.include_router(build_parse_router(parsing))
    if jobs is not None:
        app.include_router(build_jobs_router(*jobs))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=ReadyInfo)
    async def readyz() -> ReadyInfo:
        return await service.ready()

    app.add_middleware(BodyLimitMiddleware, config=config)
    keys = KeyRing(config.auth)
    # Outermost first: the API key names the client (401 without one), then fair use counts
    # that client; both refuse before the body is read.
    app.add_middleware(FairUseMiddleware, fair_use=fair_use or FairUse(config.fair_use))
    if keys.enabled:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
        require_bearer_in_openapi(app)
        logger.info("API keys on: %d accepted key(s)", len(keys.digests))
        if config.ui and not config.auth.ui_users:
            logger.warning("API keys are on but the UI has no login (auth.ui_users): anyone who "
                           "reaches / can use the models through it")
    return app


def require_bearer_in_openapi(app: FastAPI) -> None:
    """Documents the bearer key on every /v1 operation of the OpenAPI."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "an API key of auth.api_keys"}}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
