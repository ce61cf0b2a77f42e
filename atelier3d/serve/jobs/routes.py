"""``/v1/jobs/{id}``: follow a job's progress, cancel it, fetch its results (any kind).

Each stage submits its own jobs (``serve.edit.routes``, ``serve.mesh.routes``) with what is
shared here: the ``Idempotency-Key`` header and the 202 answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from atelier3d.api.jobs import JobState, JobSubmitted
from atelier3d.errors import BadRequest
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.types import Job, job_state, job_url
from atelier3d.stages.mesh import FORMATS, convert_mesh

IDEMPOTENCY = Header(None, alias="Idempotency-Key", max_length=128,
                     description="the same key with the same request returns the same job")

KEEPALIVE_S = 15.0  # SSE comment lines keep idle proxies from closing a quiet stream


def submitted(job: Job, response: Response) -> JobSubmitted:
    response.headers["Location"] = job_url(job.job_id)
    return JobSubmitted(job_id=job.job_id, status=job.status, status_url=job_url(job.job_id),
                        events_url=job_url(job.job_id, "events"),
                        result_url=job_url(job.job_id, "result"))


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


def build_jobs_router(jobs: JobService) -> APIRouter:
    """A job's state, events, result and cancel, whatever its kind."""
    router = APIRouter(prefix="/v1/jobs", responses=ERRORS, tags=["jobs"], route_class=ApiRoute)

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
                responses={200: {"content": {"image/png": {},
                                             **{media: {} for media in FORMATS.values()}}}},
                summary="The result (PNG of an edit; GLB, or OBJ/PLY/STL, of a mesh); "
                "artifact=shape gives the untextured mesh as soon as it exists")
    async def job_result(job_id: str, artifact: str | None = None,
                         format: str | None = None) -> Response:
        job = await jobs.fetch(job_id)
        found = await jobs.fetch_result(job_id, artifact)
        offered = FORMATS if job.kind.name in ("mesh", "character") else {"png": "image/png"}
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
