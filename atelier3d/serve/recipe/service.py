"""Recipes: a session exported as JSON, and replayed on the same image by a server with the same
models.

The export reads what the session holds: each object's steps in effect (prompt, how it was
asked, the chosen candidate), each parse (the mask parsed and its options), each succeeded
edit and mesh job (its request as submitted, with what the server chose filled in: an edit's
steps, CFG and size from its result, a mesh's parameters from ``mesh.*``), and the models those
ran on as ``/readyz`` reports them. The replay refuses a recipe whose image or models differ,
then does the same things in the same order on a new session: clicks, parses, and the jobs,
submitted as ordinary jobs (a job whose source is an earlier edit waits for that edit).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import numpy as np

from atelier3d import rle
from atelier3d.api.common import RLE, ImageSource
from atelier3d.api.edit import EditJobRequest
from atelier3d.api.mesh import MeshJobRequest
from atelier3d.api.parse import ParseRequest
from atelier3d.api.recipe import (
    Recipe,
    RecipeEdit,
    RecipeMesh,
    RecipeModel,
    RecipeObject,
    RecipeParse,
    RecipeStep,
    ReplayResponse,
)
from atelier3d.api.segment import SegmentRequest
from atelier3d.config import AppConfig
from atelier3d.errors import BadRequest, Conflict, Unprocessable
from atelier3d.imaging import decode_image
from atelier3d.serve.edit.service import EditService
from atelier3d.serve.health import Health
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.mesh.service import PARAMS as MESH_PARAMS
from atelier3d.serve.mesh.service import MeshService
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import SegObject, Session, Step

logger = logging.getLogger("ray.serve")

SAM = ("sam_encoder", "sam_decoder")


def image_sha256(image: np.ndarray) -> str:
    """Of the decoded pixels, so that the same picture saved again losslessly still matches."""
    return hashlib.sha256(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def model_sources(config: AppConfig) -> dict[str, str]:
    """Where each model deployment loads its weights from, as configured."""
    lora = config.edit.lightning_lora
    editor = config.edit.model + (f" + {lora.weights}/{lora.weight_name}" if lora else "")
    return {
        "sam_encoder": config.sam.checkpoint,
        "sam_decoder": config.sam.checkpoint,
        "human_parser": f"{config.parsing.segformer} + {config.parsing.pose}",
        "image_editor": editor,
        "shape3d": f"{config.mesh.model}/{config.mesh.subfolder}",
    }


def steps_in_effect(obj: SegObject) -> list[Step]:
    """The steps that made the object's current mask: those before its cursor, since its last
    reset."""
    steps: list[Step] = []
    for step in obj.steps[: obj.cursor]:
        steps = [] if step is None else [*steps, step]
    return steps


def same_mask(a: RLE | dict, b: RLE | dict, size: tuple[int, int]) -> bool:
    def pixels(mask: RLE | dict) -> np.ndarray:
        return rle.decode(mask.model_dump() if isinstance(mask, RLE) else mask, size)

    return bool(np.array_equal(pixels(a), pixels(b)))


class RecipeService:
    def __init__(self, segmentation: SegmentService, parsing: ParseService, jobs: JobService,
                 editing: EditService, meshing: MeshService, health: Health) -> None:
        self.segmentation = segmentation
        self.parsing = parsing
        self.jobs = jobs
        self.editing = editing
        self.meshing = meshing
        self.health = health
        self.config: AppConfig = segmentation.config
        self.store = segmentation.store

    # ---- export -----------------------------------------------------------------------------

    async def export(self, session_id: str) -> Recipe:
        session = await self.store.load(session_id)
        objects = [RecipeObject(object_id=object_id,
                                steps=[self._step(s) for s in steps_in_effect(obj)])
                   for object_id, obj in session.objects.items()]
        parses = [
            RecipeParse(parse_id=parse_id, object_id=stored.response.object_id,
                        mask=RLE(**stored.mask), groups=stored.request.groups,
                        complete_occlusions=stored.request.complete_occlusions)
            for parse_id, stored in session.parses.items()
            if stored.mask is not None and stored.request is not None
        ]
        jobs = [self._job(job) for job in session.jobs.values()
                if job.kind.name in ("edit", "mesh") and job.status == "succeeded"
                and job.request is not None]
        kinds = {job.kind for job in jobs}
        used = [*SAM, *(["human_parser"] if parses else []),
                *(["image_editor"] if "edit" in kinds else []),
                *(["shape3d"] if "mesh" in kinds else [])]
        ready = await self.health.ready()
        sources = model_sources(self.config)
        models = {name: RecipeModel(source=sources[name],
                                     **ready.models[name].model_dump(exclude={"note"}))
                  for name in used}
        height, width = session.size
        return Recipe(image_sha256=image_sha256(session.image), width=width, height=height,
                      models=models, objects=objects, parses=parses, jobs=jobs)

    @staticmethod
    def _step(step: Step) -> RecipeStep:
        return RecipeStep(
            points=list(step.points), labels=list(step.labels), box=step.box,
            refine=step.refine, mask_input=RLE(**step.mask_input) if step.mask_input else None,
            multimask=step.multimask, selected=step.selected,
            mask=step.candidates[step.selected].rle)

    def _job(self, job) -> RecipeEdit | RecipeMesh:
        # Not the session's id: it is a capability, and the replay makes a session of its own.
        body = {k: v for k, v in job.request.items() if k not in ("session_id", "upload_sha256")}
        if job.kind.name == "edit":
            meta = job.result.meta
            chosen = {"steps": meta["steps"], "true_cfg_scale": meta["true_cfg_scale"]}
            body.update({k: v for k, v in chosen.items() if body.get(k) is None})
            return RecipeEdit(**body, job_id=job.job_id,
                              output_size=(meta["width"], meta["height"]))
        defaults = self.config.mesh
        body.update({k: getattr(defaults, k) for k in MESH_PARAMS
                     if body.get(k) is None and hasattr(defaults, k)})
        return RecipeMesh(**body, job_id=job.job_id)

    # ---- replay -----------------------------------------------------------------------------

    async def check(self, recipe: Recipe, data: bytes) -> None:
        """4xx unless this server has every model the recipe names and ``data`` is its image."""
        ready = await self.health.ready()
        missing = []
        for name, wanted in recipe.models.items():
            have = ready.models.get(name)
            if have is None or (have.model_type, have.checkpoint_sha256) != (
                    wanted.model_type, wanted.checkpoint_sha256):
                served = (f"this server has {have.model_type}, sha256 "
                          f"{have.checkpoint_sha256[:12]}" if have else "not served here")
                missing.append(f"{name}: {wanted.model_type} from {wanted.source}, sha256 "
                               f"{wanted.checkpoint_sha256[:12]} ({served})")
        if missing:
            raise Unprocessable("this server does not have the recipe's models: "
                                + "; ".join(missing))
        limits = self.config.limits
        image = await asyncio.to_thread(decode_image, data, limits.max_pixels,
                                        max_aspect_ratio=limits.max_aspect_ratio)
        digest = image_sha256(image)
        if image.shape[:2] != (recipe.height, recipe.width) or digest != recipe.image_sha256:
            raise BadRequest(
                f"the image is not the recipe's: {image.shape[1]}x{image.shape[0]}, sha256 "
                f"{digest[:12]}; the recipe was made on {recipe.width}x{recipe.height}, sha256 "
                f"{recipe.image_sha256[:12]}")

    async def replay(self, recipe: Recipe, data: bytes, client: str) -> ReplayResponse:
        await self.check(recipe, data)
        info = await self.segmentation.create_session(data, client)
        replay = Replay(self, info.session_id, client)
        try:
            for obj in recipe.objects:
                await replay.object(obj)
            for parse in recipe.parses:
                await replay.parse(parse)
            for job in recipe.jobs:
                await replay.job(job)
        except BaseException:
            await self.store.remove(info.session_id)
            raise
        logger.info("session %s: replayed %d objects, %d parses, %d jobs",
                    info.session_id[:10], len(recipe.objects), len(recipe.parses),
                    len(recipe.jobs))
        return ReplayResponse(session_id=info.session_id, objects=replay.objects,
                              parses=replay.parses, jobs=replay.jobs,
                              mismatched_masks=replay.mismatched)


class Replay:
    """One recipe replayed on a new session: the recipe's ids mapped to the new ones."""

    def __init__(self, service: RecipeService, session_id: str, client: str) -> None:
        self.service = service
        self.session_id = session_id
        self.client = client
        self.objects: dict[str, str] = {}
        self.parses: dict[str, str] = {}
        self.jobs: dict[str, str] = {}
        self.mismatched: list[str] = []

    async def _session(self) -> Session:
        return await self.service.store.load(self.session_id)

    async def object(self, obj: RecipeObject) -> None:
        segmentation = self.service.segmentation
        object_id = (await segmentation.create_object(self.session_id)).object_id
        self.objects[obj.object_id] = object_id
        for step in obj.steps:
            made = await segmentation.segment(self.session_id, SegmentRequest(
                points=step.points, labels=step.labels, box=step.box, refine=step.refine,
                mask_input=step.mask_input, multimask=step.multimask, object_id=object_id))
            if step.selected >= len(made.masks):
                raise Conflict(f"object {obj.object_id!r}: the replayed click gave "
                               f"{len(made.masks)} candidates, the recipe chose {step.selected}")
            if step.selected != made.selected:
                await segmentation.select(self.session_id, object_id, step.selected)
        if obj.steps:
            session = await self._session()
            current = session.get_object(object_id).current
            if not same_mask(current.candidates[current.selected].rle, obj.steps[-1].mask,
                             session.size):
                self.mismatched.append(obj.object_id)

    async def parse(self, parse: RecipeParse) -> None:
        """Parses the recipe's mask: through its object when the replayed object has that
        mask (so the parse names it, as the recorded one did), else as an RLE."""
        options = {"groups": parse.groups, "complete_occlusions": parse.complete_occlusions}
        object_id = self.objects.get(parse.object_id or "")
        request = ParseRequest(rle=parse.mask, **options)
        if object_id is not None:
            session = await self._session()
            current = session.get_object(object_id).current
            if current is not None and same_mask(current.candidates[current.selected].rle,
                                                 parse.mask, session.size):
                request = ParseRequest(object_id=object_id, **options)
        response = await self.service.parsing.parse(self.session_id, request)
        self.parses[parse.parse_id] = response.parse_id

    def _source(self, job_id: str, source: ImageSource) -> ImageSource:
        """``source`` with the replay's ids for the recipe's."""
        change = {}
        for field, ids, what in (("object_id", self.objects, "object"),
                                 ("parse_id", self.parses, "parse"),
                                 ("job_id", self.jobs, "job")):
            recorded = getattr(source, field)
            if recorded is not None:
                if recorded not in ids:
                    raise BadRequest(f"recipe job {job_id!r} uses {what} {recorded!r}, which "
                                     "the recipe does not have (or has later)")
                change[field] = ids[recorded]
        return source.model_copy(update=change)

    async def job(self, entry: RecipeEdit | RecipeMesh) -> None:
        sources = [entry.source]
        if isinstance(entry, RecipeEdit):
            sources += entry.extra_sources
        else:
            sources += [part.source for part in entry.parts or []]
        for source in sources:  # an earlier edit as input: it must have finished
            if source.kind == "job" and source.job_id in self.jobs:
                done = await self.service.jobs.wait(self.jobs[source.job_id])
                if done.status != "succeeded":
                    raise Conflict(f"replayed job {source.job_id!r} {done.status}: "
                                   f"recipe job {entry.job_id!r} needs its result")
        body = entry.model_dump(exclude={"kind", "job_id", "output_size"})
        body["session_id"] = self.session_id
        body["source"] = self._source(entry.job_id, entry.source)
        if isinstance(entry, RecipeEdit):
            body["extra_sources"] = [self._source(entry.job_id, s) for s in entry.extra_sources]
            job = await self.service.editing.submit(EditJobRequest(**body), self.client)
        else:
            if entry.parts is not None:
                body["parts"] = [part.model_copy(update={
                    "source": self._source(entry.job_id, part.source)}) for part in entry.parts]
            job = await self.service.meshing.submit(MeshJobRequest(**body), self.client)
        self.jobs[entry.job_id] = job.job_id
