"""``POST /v1/jobs/edit``: text-driven edits of a session's images, as jobs."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from atelier3d.api.edit import EditJobRequest
from atelier3d.api.jobs import JobSubmitted
from atelier3d.serve.auth import client_key
from atelier3d.serve.edit.service import EditService
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.jobs.routes import IDEMPOTENCY, submitted


def build_edit_router(editing: EditService) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", responses=ERRORS, tags=["jobs"], route_class=ApiRoute)

    @router.post("/edit", status_code=202, response_model=JobSubmitted,
                 summary="Edit a session's image (or a cut-out, part, earlier edit) with text")
    async def submit_edit(body: EditJobRequest, request: Request, response: Response,
                          idempotency_key: str | None = IDEMPOTENCY) -> JobSubmitted:
        job = await editing.submit(body, client_key(request), idempotency_key)
        return submitted(job, response)

    return router
