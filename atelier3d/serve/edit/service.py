"""The editing service: text-driven edits of a session's images, as jobs on the ImageEditor."""

from __future__ import annotations

import numpy as np

from atelier3d.api.edit import EditJobRequest
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.sources import (
    SourceResolver,
    decode_mask,
    job_sources,
    session_sources,
)
from atelier3d.serve.jobs.types import Job, streaming_kind
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import Session
from atelier3d.stages.edit import EditRequest

# Share of an edit's time per stage, for one progress fraction: denoising dominates.
EDIT_STAGES = {"encode": 0.1, "denoise": 0.8, "decode": 0.1}


class EditService:
    def __init__(self, segmentation: SegmentService, jobs: JobService,
                 resolver: SourceResolver, editor) -> None:
        self.store = segmentation.store
        self.settings = segmentation.config.edit
        self.jobs = jobs
        self.resolver = resolver
        jobs.register(streaming_kind("edit", segmentation.config.jobs.edit, editor, "edit",
                                     EDIT_STAGES))

    def request(self, body: EditJobRequest, session: Session | None = None) -> EditRequest:
        """The ImageEditor's request for ``body``, validated (4xx) before anything queues."""
        session = session or self.store.get(body.session_id)
        image = self.resolver.image(session, body.source)
        mask: np.ndarray | None = None
        if body.mask is not None:
            mask = decode_mask(body.mask, image.shape[:2])
        elif body.preset == "complete_occluded":
            mask = self.resolver.hidden_region(session, body.source)
        extras = [self.resolver.image(session, source) for source in body.extra_sources]
        return EditRequest.build(
            self.settings, images=[image, *extras], mask=mask, preset=body.preset,
            prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed,
            steps=body.steps, true_cfg_scale=body.true_cfg_scale, width=body.width,
            height=body.height,
        )

    async def submit(self, body: EditJobRequest, client: str,
                     idempotency_key: str | None = None) -> Job:
        session = await self.store.load(body.session_id)

        async def build() -> EditRequest:
            sources = [body.source, *body.extra_sources]
            await self.jobs.prefetch(session, job_sources(sources))
            for other in session_sources(sources):  # held here for the resolver (Redis store)
                await self.store.load(other)
            return self.request(body, session)

        return await self.jobs.submit("edit", build, body.model_dump(), session=session,
                                      client=client, idempotency_key=idempotency_key)
