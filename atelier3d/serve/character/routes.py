"""``POST /v1/sessions/{id}/character3d``: a segmented character to a layered 3D asset, as one
job (its stages' results are ordinary parses, edits and meshes of the session)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from atelier3d.api.character import CharacterJobRequest
from atelier3d.api.jobs import JobSubmitted
from atelier3d.serve.auth import client_key
from atelier3d.serve.character.service import CharacterService
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.jobs.routes import IDEMPOTENCY, submitted


def build_character_router(character: CharacterService) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions/{session_id}", responses=ERRORS, tags=["jobs"],
                       route_class=ApiRoute)

    @router.post("/character3d", status_code=202, response_model=JobSubmitted,
                 summary="Character to 3D: parse, complete garments, optional T-pose, checks, "
                 "layered mesh, as one job (resumable from any stage)")
    async def submit_character(session_id: str, body: CharacterJobRequest, request: Request,
                               response: Response,
                               idempotency_key: str | None = IDEMPOTENCY) -> JobSubmitted:
        job = await character.submit(session_id, body, client_key(request), idempotency_key)
        return submitted(job, response)

    return router
