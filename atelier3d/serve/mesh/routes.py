"""``POST /v1/jobs/mesh``: 3D assets from a session's images or an uploaded cut-out, as jobs."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from atelier3d.api.jobs import JobSubmitted
from atelier3d.api.mesh import MeshJobRequest
from atelier3d.errors import BadRequest, Unprocessable, validation_message
from atelier3d.serve.auth import client_key
from atelier3d.serve.http import ERRORS, ApiRoute, require_json
from atelier3d.serve.jobs.routes import IDEMPOTENCY, submitted
from atelier3d.serve.mesh.service import MeshService


async def mesh_body(request: Request) -> tuple[MeshJobRequest, bytes | None]:
    """JSON body, or multipart: a file field ``image`` (RGBA cut-out) and an optional JSON field
    ``request`` with the parameters."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        require_json(request)
        try:
            return MeshJobRequest.model_validate_json(await request.body()), None
        except ValidationError as exc:
            raise Unprocessable(validation_message(exc.errors())) from None
    form = await request.form(max_files=1, max_fields=4)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise BadRequest("a multipart mesh request needs a file field named 'image'")
    params = form.get("request") or "{}"
    if not isinstance(params, str):
        raise BadRequest("the 'request' field must be JSON text, not a file")
    try:
        body = MeshJobRequest.model_validate_json(params)
    except ValidationError as exc:
        raise Unprocessable(validation_message(exc.errors())) from None
    return body, await upload.read()


def build_mesh_router(meshing: MeshService) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", responses=ERRORS, tags=["jobs"], route_class=ApiRoute)

    @router.post("/mesh", status_code=202, response_model=JobSubmitted,
                 summary="Make a 3D asset: JSON (session sources) or multipart (an RGBA image)",
                 openapi_extra={"requestBody": {"content": {
                     "application/json": {"schema": MeshJobRequest.model_json_schema()},
                     "multipart/form-data": {"schema": {"type": "object", "properties": {
                         "image": {"type": "string", "format": "binary"},
                         "request": {"type": "string", "description": "MeshJobRequest JSON"},
                     }, "required": ["image"]}},
                 }}})
    async def submit_mesh(request: Request, response: Response,
                          idempotency_key: str | None = IDEMPOTENCY) -> JobSubmitted:
        body, upload = await mesh_body(request)
        job = await meshing.submit(body, client_key(request), idempotency_key, upload)
        return submitted(job, response)

    return router
