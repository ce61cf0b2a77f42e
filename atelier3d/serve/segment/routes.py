"""``/v1/sessions``: uploads, clicks and boxes, objects and their history, cut-outs."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from atelier3d.api.segment import (
    CutoutRequest,
    ObjectState,
    SegmentRequest,
    SegmentResponse,
    SelectRequest,
    SessionInfo,
)
from atelier3d.errors import BadRequest
from atelier3d.serve.auth import client_key
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.segment.service import SegmentService


def build_router(service: SegmentService) -> APIRouter:
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
