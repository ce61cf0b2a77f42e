"""Character to 3D: one job that runs the journey's stages on a segmented character.

The job is a stream of events made here, in the Gateway (``JobKind.start`` returns it), read by
the job runner like a model's: each stage reports ``progress`` under its own name (``parse``,
``complete``, ``t_pose``, ``checks``, ``mesh``; a stage made of a child job reports that job's
progress), ends with an artifact naming what it made, and the job ends with the layered GLB.
What a stage makes is an ordinary result of the session, made the ordinary way: a parse kept
by ``ParseService``, edit and mesh jobs submitted to ``JobService`` (their own queues, events,
results and cancel), so each can be opened, edited by hand and handed to a later character
job (``resume_from`` with ``previous_job_id`` or ``reuse``), which skips the stages before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from atelier3d.api.character import (
    CHARACTER_STAGES,
    CharacterJobRequest,
    CharacterResults,
    CharacterStage,
)
from atelier3d.api.common import ImageSource, MaskSource
from atelier3d.api.edit import EditJobRequest
from atelier3d.api.parse import ParseRequest
from atelier3d.config import JobKindSettings
from atelier3d.errors import ApiError, BadRequest, Conflict, NotFound, Unprocessable
from atelier3d.imaging import crop_with_margin, decode_png
from atelier3d.serve.character.layers import completed_garment, full_frame, paste, too_small
from atelier3d.serve.edit.service import EditService
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.sources import OBJECT_MARGIN
from atelier3d.serve.jobs.types import Job, JobKind
from atelier3d.serve.mesh.service import PARAMS as MESH_PARAMS
from atelier3d.serve.mesh.service import MeshService
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.sessions.session import Session
from atelier3d.stages.edit import EditRequest
from atelier3d.stages.mesh import GLB, MeshRequest
from atelier3d.stages.parse import GARMENT_LABELS, LABELS, ParseResult

logger = logging.getLogger("ray.serve")

# Share of the job's time per stage (tiny and full pipelines alike: the mesh's denoising and
# volume decoding of every layer, then the edits); a stage skipped or reused counts as done.
CHARACTER_WEIGHTS = {"parse": 0.05, "complete": 0.25, "t_pose": 0.15, "checks": 0.05,
                     "mesh": 0.5}
GARMENTS = tuple(LABELS[i] for i in GARMENT_LABELS)
# Every part a layered asset may need: each garment, the hair and the body (skin) structure.
PARSE_GROUPS = ["clothing", "hair", "body-skin"]
BODY_PART, HAIR_PART = "body-skin", "hair"
UNITS = 100  # progress steps per child job: its progress fraction, in hundredths
JSON = "application/json"


class StageFailed(ApiError):
    """A stage's own job failed: the character job fails with its reason."""

    status, code = 422, "stage_failed"


@dataclass
class CharacterPlan:
    """What a submitted character job runs: the request and the results it starts from."""

    session_id: str
    client: str
    body: CharacterJobRequest
    results: CharacterResults


def progress(stage: CharacterStage, step: int, total: int) -> dict:
    return {"type": "progress", "stage": stage, "step": step, "total": total}


def artifact(name: str, meta: dict) -> dict:
    """An event naming a stage's result; its bytes are the same JSON as its ``meta``."""
    return {"type": "artifact", "name": name, "media_type": JSON,
            "data": json.dumps(meta).encode(), "meta": meta}


class CharacterService:
    def __init__(self, parsing: ParseService, editing: EditService, meshing: MeshService,
                 jobs: JobService) -> None:
        self.parsing = parsing
        self.editing = editing
        self.meshing = meshing
        self.jobs = jobs
        self.segmentation = parsing.segmentation
        self.store = parsing.store
        config = parsing.config
        # A character job holds no model itself: it waits on its edit and mesh jobs, which
        # queue in their own kinds; as many may run as those can.
        settings = JobKindSettings(
            max_running=config.jobs.edit.max_running + config.jobs.mesh.max_running,
            max_queued=config.jobs.mesh.max_queued)
        jobs.register(JobKind("character", settings, self._run, CHARACTER_WEIGHTS))

    # ---- submit -----------------------------------------------------------------------------

    async def submit(self, session_id: str, body: CharacterJobRequest, client: str,
                     idempotency_key: str | None = None) -> Job:
        session = await self.store.load(session_id)

        async def build() -> CharacterPlan:
            unknown = [g for g in body.garments if g not in GARMENTS]
            if unknown:
                raise BadRequest(f"unknown garment {', '.join(map(repr, unknown))}: garments "
                                 f"are ATR labels, one of {', '.join(GARMENTS)}")
            if len(set(body.garments)) != len(body.garments):
                raise BadRequest("each garment may be named once")
            self.segmentation.source_mask(session, MaskSource(object_id=body.object_id),
                                          "segment the character first")
            if body.previous_job_id is not None:
                await self.jobs.prefetch(session, [body.previous_job_id])
            results = self._reused(session, body)
            await self.jobs.prefetch(session, [j for j in (*results.completed.values(),
                                                           results.t_pose_job_id) if j])
            self._check_reused(session, body, results)
            return CharacterPlan(session_id, client, body, results)

        payload = {"session_id": session_id, **body.model_dump()}
        return await self.jobs.submit("character", build, payload, session=session,
                                      client=client, idempotency_key=idempotency_key)

    def _reused(self, session: Session, body: CharacterJobRequest) -> CharacterResults:
        """The previous job's results (as far as it got), overridden by ``reuse``."""
        results = CharacterResults()
        if body.previous_job_id is not None:
            previous = self.jobs.get_in_session(session, body.previous_job_id)
            if previous.kind.name != "character":
                raise BadRequest(f"job {body.previous_job_id!r} is a {previous.kind.name} job, "
                                 "not a character job")
            metas = [a.meta for a in previous.artifacts.values()]
            if previous.result is not None:
                metas.append(previous.result.meta)
            for meta in metas:  # in the order the stages made them: the latest is the fullest
                results = CharacterResults.model_validate(meta["results"])
        if body.reuse is not None:
            given = body.reuse.model_dump(exclude_unset=True)
            completed = {**results.completed, **given.pop("completed", {})}
            results = results.model_copy(update={**given, "completed": completed})
        return results

    def _check_reused(self, session: Session, body: CharacterJobRequest,
                      results: CharacterResults) -> None:
        """Every result the skipped stages would have made is there and usable (4xx if not)."""
        skipped = CHARACTER_STAGES[:CHARACTER_STAGES.index(body.resume_from)]

        def needed(what: str, field: str) -> ApiError:
            return Conflict(f"resuming from {body.resume_from!r} needs {what}: give "
                            f"previous_job_id, or reuse.{field}")

        if "parse" in skipped:
            if results.parse_id is None:
                raise needed("the character's parse", "parse_id")
            parsed = self._parse(session, results.parse_id)
            self._garments_in(parsed, body.garments, "the reused parse")
        if "complete" in skipped:
            missing = [g for g in body.garments if g not in results.completed]
            if missing:
                raise needed(f"the completion of {', '.join(missing)}", "completed")
            for job_id in results.completed.values():
                if job_id is not None:
                    self._edit_image(session, job_id)
        if "t_pose" in skipped and body.t_pose:
            if results.t_pose_job_id is None:
                raise needed("the T-pose edit", "t_pose_job_id")
            self._edit_image(session, results.t_pose_job_id)
        if "checks" in skipped:
            if results.checks_parse_id is None:
                raise needed("the parse checked for 3D", "checks_parse_id")
            self._parse(session, results.checks_parse_id)

    # ---- lookups ----------------------------------------------------------------------------

    @staticmethod
    def _parse(session: Session, parse_id: str) -> ParseResult:
        stored = session.parses.get(parse_id)
        if stored is None:
            raise NotFound(f"parse {parse_id!r} not found in this session")
        return stored.result

    def _edit_image(self, session: Session, job_id: str) -> np.ndarray:
        job = self.jobs.get_in_session(session, job_id)
        if job.kind.name != "edit":
            raise BadRequest(f"job {job_id!r} is a {job.kind.name} job, not an edit")
        if job.status != "succeeded" or job.result is None:
            raise Conflict(f"edit {job_id!r} is {job.status}: it has no image")
        return decode_png(job.result.data)

    @staticmethod
    def _garments_in(parsed: ParseResult, garments: list[str], what: str) -> None:
        names = {p.name for p in parsed.parts}
        missing = [g for g in garments if g not in names]
        if missing:
            found = ", ".join(n for n in names if n in GARMENTS) or "none"
            raise Unprocessable(f"{what} has no {', '.join(missing)} (its garments: {found})")

    # ---- the job ----------------------------------------------------------------------------

    async def _run(self, plan: CharacterPlan) -> AsyncIterator[dict]:
        results = plan.results.model_copy(deep=True)
        first = CHARACTER_STAGES.index(plan.body.resume_from)
        stages = {"parse": self._stage_parse, "complete": self._stage_complete,
                  "t_pose": self._stage_t_pose, "checks": self._stage_checks,
                  "mesh": self._stage_mesh}
        for index, stage in enumerate(CHARACTER_STAGES):
            if index < first:
                yield progress(stage, 1, 1)
                yield artifact(stage, {"stage": stage, "reused": True,
                                       "results": results.model_dump()})
                continue
            async for event in stages[stage](plan, results):
                yield event
        mesh = self.jobs.get(results.mesh_job_id)  # submitted by the mesh stage, here
        yield {"type": "result", "media_type": GLB, "data": mesh.result.data,
               "meta": {**mesh.result.meta, "results": results.model_dump()}}

    async def _submit(self, plan: CharacterPlan, session: Session, kind: str, payload: dict,
                      make: Callable[[], EditRequest | MeshRequest]) -> Job:
        """A stage's own ``kind`` job for the character job's client, its request made by
        ``make()`` when the job service builds it (after its own checks, as for any job)."""

        async def build() -> EditRequest | MeshRequest:
            return make()

        return await self.jobs.submit(kind, build, payload, session=session, client=plan.client)

    async def _child(self, job: Job, stage: CharacterStage, done: int,
                     units: int) -> AsyncIterator[dict]:
        """Follows a stage's own job, reporting its progress as the stage's (``done`` of
        ``units`` child jobs before it); a cancelled character job cancels it."""
        try:
            async for event in self.jobs.follow(job.job_id):
                step = done * UNITS + round(UNITS * float(event["progress"]))
                yield progress(stage, min(step, units * UNITS), units * UNITS)
        finally:
            if not job.finished and job.task is not None:
                job.task.cancel()
        if job.status != "succeeded":
            reason = f": {job.error['message']}" if job.error else ""
            raise StageFailed(f"stage {stage}: {job.kind.name} job {job.job_id} "
                              f"{job.status}{reason}")

    async def _stage_parse(self, plan: CharacterPlan,
                           results: CharacterResults) -> AsyncIterator[dict]:
        yield progress("parse", 0, 1)
        session = await self.store.load(plan.session_id)
        mask = self.segmentation.source_mask(session, MaskSource(object_id=plan.body.object_id),
                                             "segment the character first")
        recorded = ParseRequest(object_id=plan.body.object_id, groups=PARSE_GROUPS,
                                complete_occlusions=True)
        response = await self.parsing.parse_image(plan.session_id, session.image, mask,
                                                  plan.body.object_id, PARSE_GROUPS, True,
                                                  recorded=recorded)
        results.parse_id = response.parse_id
        parsed = self._parse(await self.store.load(plan.session_id), response.parse_id)
        self._garments_in(parsed, plan.body.garments, "the character's parse")
        yield progress("parse", 1, 1)
        yield artifact("parse", {"stage": "parse", "parse_id": response.parse_id,
                                 "results": results.model_dump()})

    async def _stage_complete(self, plan: CharacterPlan,
                              results: CharacterResults) -> AsyncIterator[dict]:
        garments = plan.body.garments
        units = max(1, len(garments))
        yield progress("complete", 0, units * UNITS)
        session = await self.store.load(plan.session_id)
        options = plan.body.edit
        for index, garment in enumerate(garments):
            source = ImageSource(kind="part", parse_id=results.parse_id, part=garment)
            if self.editing.resolver.hidden_region(session, source) is None:
                # Nothing hides it: the part is used as it is.
                results.completed[garment] = None
                yield progress("complete", (index + 1) * UNITS, units * UNITS)
                yield artifact(f"complete.{garment}", {
                    "stage": "complete", "garment": garment, "job_id": None,
                    "reason": "nothing hides it", "results": results.model_dump()})
                continue
            job = await self.editing.submit(EditJobRequest(
                session_id=plan.session_id, preset="complete_occluded", source=source,
                seed=options.seed, steps=options.steps, true_cfg_scale=options.true_cfg_scale,
            ), plan.client)
            async for event in self._child(job, "complete", index, units):
                yield event
            results.completed[garment] = job.job_id
            yield artifact(f"complete.{garment}", {
                "stage": "complete", "garment": garment, "job_id": job.job_id,
                "results": results.model_dump()})
        if not garments:
            yield progress("complete", UNITS, UNITS)

    def _completed_layers(self, session: Session, parsed: ParseResult,
                          results: CharacterResults, garments: list[str]) -> dict[str, np.ndarray]:
        """Each chosen garment of the character's parse, full frame, completed where an edit
        filled what hid it."""
        parts = {p.name: p for p in parsed.parts}
        layers = {}
        for garment in garments:
            part = parts[garment]
            job_id = results.completed.get(garment)
            rgba = part.rgba
            completed = parsed.completed.get(garment)
            if job_id is not None and completed is not None \
                    and completed.shape == part.rgba.shape:
                rgba = completed_garment(part, completed, self._edit_image(session, job_id))
            layers[garment] = full_frame(parsed.size, part.box, rgba)
        return layers

    async def _stage_t_pose(self, plan: CharacterPlan,
                            results: CharacterResults) -> AsyncIterator[dict]:
        if not plan.body.t_pose:
            yield progress("t_pose", 1, 1)
            yield artifact("t_pose", {"stage": "t_pose", "skipped": True,
                                      "results": results.model_dump()})
            return
        yield progress("t_pose", 0, UNITS)
        session = await self.store.load(plan.session_id)
        parsed = self._parse(session, results.parse_id)
        mask = self.segmentation.source_mask(session, MaskSource(object_id=plan.body.object_id),
                                             "segment the character first")
        # The character as cut out, its completed garments over it, cropped as an object is.
        character = np.dstack([session.image, mask.astype(np.uint8) * 255])
        for layer in self._completed_layers(session, parsed, results,
                                            plan.body.garments).values():
            character = paste(character, layer)
        x0, y0, x1, y1 = crop_with_margin(character[..., 3] > 0, OBJECT_MARGIN)
        image = character[y0:y1, x0:x1]
        options = plan.body.edit
        fields = {"preset": "t_pose", "seed": options.seed, "steps": options.steps,
                  "true_cfg_scale": options.true_cfg_scale, "width": options.width,
                  "height": options.height}

        job = await self._submit(
            plan, session, "edit", {"character_t_pose": results.model_dump(), **fields},
            lambda: EditRequest.build(self.editing.settings, images=[image], **fields))
        async for event in self._child(job, "t_pose", 0, 1):
            yield event
        results.t_pose_job_id = job.job_id
        yield artifact("t_pose", {"stage": "t_pose", "job_id": job.job_id,
                                  "results": results.model_dump()})

    async def _stage_checks(self, plan: CharacterPlan,
                            results: CharacterResults) -> AsyncIterator[dict]:
        """The pre-3D checks (the parser's) of the image that goes to 3D: the T-pose edit,
        parsed here (its parts are the layers), or the character's own parse."""
        yield progress("checks", 0, 1)
        session = await self.store.load(plan.session_id)
        if plan.body.t_pose:
            image = self._edit_image(session, results.t_pose_job_id)[..., :3]
            mask = await self.segmentation.auto_mask(image)
            response = await self.parsing.parse_image(plan.session_id, image, mask, None,
                                                      PARSE_GROUPS, True)
            results.checks_parse_id = response.parse_id
            checks = response.checks
        else:
            results.checks_parse_id = results.parse_id
            checks = self._stored_checks(session, results.parse_id)
        yield progress("checks", 1, 1)
        yield artifact("checks", {
            "stage": "checks", "parse_id": results.checks_parse_id,
            "passed": all(c.passed for c in checks),
            "checks": [c.model_dump() for c in checks], "results": results.model_dump()})

    @staticmethod
    def _stored_checks(session: Session, parse_id: str) -> list:
        stored = session.parses.get(parse_id)
        if stored is None:
            raise NotFound(f"parse {parse_id!r} not found in this session")
        return stored.response.checks

    async def _stage_mesh(self, plan: CharacterPlan,
                          results: CharacterResults) -> AsyncIterator[dict]:
        yield progress("mesh", 0, UNITS)
        session = await self.store.load(plan.session_id)
        layers, skipped = self._mesh_layers(session, plan.body, results)
        if not layers:
            reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
            raise StageFailed(f"stage mesh: no part of the character can become a mesh "
                              f"({reasons or 'nothing chosen'})")
        options = plan.body.mesh.model_dump()
        params = {k: options[k] for k in MESH_PARAMS if options.get(k) is not None}

        job = await self._submit(
            plan, session, "mesh", {"character_layers": results.model_dump(), **params},
            lambda: MeshRequest.build(parts=list(layers.items()), **params))
        async for event in self._child(job, "mesh", 0, 1):
            yield event
        results.mesh_job_id = job.job_id
        yield artifact("mesh", {"stage": "mesh", "job_id": job.job_id,
                                "nodes": list(layers), "skipped": skipped,
                                "results": results.model_dump()})

    def _mesh_layers(self, session: Session, body: CharacterJobRequest,
                     results: CharacterResults) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The asset's layers, named as its GLB nodes (body, each garment, hair), each in the
        frame of the parse that was checked; and the parts left out, with why."""
        final = self._parse(session, results.checks_parse_id)
        parts = {p.name: p for p in final.parts}
        wanted: dict[str, np.ndarray | None] = {}
        body_part = parts.get(BODY_PART)
        wanted["body"] = (full_frame(final.size, body_part.box, body_part.rgba)
                          if body_part else None)
        if results.checks_parse_id == results.parse_id:  # the character's own frame
            present = [g for g in body.garments if g in parts]
            wanted.update(self._completed_layers(session, final, results, present))
        for garment in body.garments:
            if garment not in wanted:
                part = parts.get(garment)
                wanted[garment] = full_frame(final.size, part.box, part.rgba) if part else None
        if body.hair:
            hair = parts.get(HAIR_PART)
            wanted["hair"] = full_frame(final.size, hair.box, hair.rgba) if hair else None
        layers, skipped = {}, {}
        for name, rgba in wanted.items():
            why = "not in the parse" if rgba is None else too_small(rgba)
            if why is None:
                layers[name] = rgba
            else:
                skipped[name] = why
        return layers, skipped
