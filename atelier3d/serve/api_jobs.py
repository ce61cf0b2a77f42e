"""``/v1/jobs``: submit edits and meshes, follow their progress, cancel, fetch results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from atelier3d.errors import BadRequest, Unprocessable
from atelier3d.meshing import FORMATS, convert_mesh
from atelier3d.serve.editing import EditService
from atelier3d.serve.http import ERRORS, ApiRoute, client_key, require_json
from atelier3d.serve.jobs import Job, JobService, job_state, job_url
from atelier3d.serve.meshing import MeshService
from atelier3d.serve.schemas import EditJobRequest, JobState, JobSubmitted, MeshJobRequest

JobsApi = tuple[JobService, EditService, MeshService]
IDEMPOTENCY = Header(None, alias="Idempotency-Key", max_length=128,
                     description="the same key with the same request returns the same job")
KEEPALIVE_S = 15.0  # SSE comment lines keep idle proxies from closing a quiet stream


def submitted(job: Job, response: Response) -> JobSubmitted:
    response.headers["Location"] = job_url(job.job_id)
    return JobSubmitted(job_id=job.job_id, status=job.status, status_url=job_url(job.job_id),
                        events_url=job_url(job.job_id, "events"),
                        result_url=job_url(job.job_id, "result"))


async def mesh_body(request: Request) -> tuple[MeshJobRequest, bytes | None]:
    """JSON body, or multipart: a file field ``image`` (RGBA cut-out) and an optional JSON field
    ``request`` with the parameters."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        require_json(request)
        try:
            return MeshJobRequest.model_validate_json(await request.body()), None
        except ValidationError as exc:
            raise Unprocessable(_first_errors(exc)) from None
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
        raise Unprocessable(_first_errors(exc)) from None
    return body, await upload.read()


def _first_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"]
                     else e["msg"] for e in exc.errors()[:5])


async def event_lines(jobs: JobService, job_id: str, after: int,
                      sse: bool) -> AsyncIterator[bytes]:
    events = jobs.follow(job_id, after).__aiter__()
    # One pending read carried across keep-alives: cancelling it (as ``wait_for`` would) would
    # close the ``follow`` generator, ending the stream at the first quiet spell, such as a job
    # waiting for a replaced replica.
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
            if not done:
                yield b": keep-alive\n\n" if sse else b"\n"  # NDJSON readers skip blank lines
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            data = json.dumps(event, separators=(",", ":"))
            if sse:
                yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n".encode()
            else:
                yield (data + "\n").encode()
    finally:  # the client went away: stop following
        if pending is not None:
            pending.cancel()


def build_jobs_router(jobs: JobService, editing: EditService, meshing: MeshService) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", responses=ERRORS, tags=["jobs"], route_class=ApiRoute)

    @router.post("/edit", status_code=202, response_model=JobSubmitted,
                 summary="Edit a session's image (or a cut-out, part, earlier edit) with text")
    async def submit_edit(body: EditJobRequest, request: Request, response: Response,
                          idempotency_key: str | None = IDEMPOTENCY) -> JobSubmitted:
        job = await editing.submit(body, client_key(request), idempotency_key)
        return submitted(job, response)

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

    @router.get("/{job_id}", response_model=JobState)
    async def get_job(job_id: str) -> JobState:
        return job_state(await jobs.fetch(job_id))

    @router.delete("/{job_id}", response_model=JobState,
                   summary="Cancel a queued or running job (it stops at its next step)")
    async def cancel_job(job_id: str) -> JobState:
        return job_state(await jobs.cancel(job_id))

    @router.get("/{job_id}/events", response_class=StreamingResponse,
                responses={200: {"content": {"application/x-ndjson": {},
                                             "text/event-stream": {}}}},
                summary="Progress events: NDJSON, or SSE with Accept: text/event-stream")
    async def job_events(job_id: str, request: Request,
                         after: int = Query(-1, ge=-1, description="events with seq > after"),
                         format: Literal["ndjson", "sse"] | None = None,
                         last_event_id: str | None = Header(None, alias="Last-Event-ID"),
                         ) -> StreamingResponse:
        await jobs.fetch(job_id)  # 404 before the stream starts
        sse = format == "sse" or (format is None and "text/event-stream"
                                  in request.headers.get("accept", ""))
        # isdecimal and ASCII: str.isdigit also accepts "²", which int() refuses.
        if last_event_id is not None and last_event_id.isascii() and last_event_id.isdecimal():
            after = max(after, int(last_event_id))
        media_type = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(event_lines(jobs, job_id, after, sse), media_type=media_type,
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @router.get("/{job_id}/result", response_class=Response,
                responses={200: {"content": {"image/png": {}, "model/gltf-binary": {}}}},
                summary="The result (PNG of an edit; GLB, or OBJ/PLY/STL, of a mesh); "
                "artifact=shape gives the untextured mesh as soon as it exists")
    async def job_result(job_id: str, artifact: str | None = None,
                         format: str | None = None) -> Response:
        job = await jobs.fetch(job_id)
        found = await jobs.fetch_result(job_id, artifact)
        offered = FORMATS if job.kind.name == "mesh" else {"png": "image/png"}
        if format is not None and format not in offered:
            raise BadRequest(f"format {format!r} is not offered for this job "
                             f"(use: {', '.join(offered)})")
        if format is None or offered[format] == found.media_type:
            return Response(content=found.data, media_type=found.media_type)
        data = await asyncio.to_thread(convert_mesh, found.data, format)
        return Response(content=data, media_type=FORMATS[format],
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.'
                                 f'{format}"'})

    return router
