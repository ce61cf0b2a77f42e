"""The meshing service: images of a session (or an upload) to 3D assets, as mesh jobs: on
Shape3D alone (``mesh.stages: single``), or its accelerator half on Shape3D and its CPU half on
MeshFinish (``split``, see ``split``)."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from atelier3d.api.common import ImageSource, MaskSource
from atelier3d.api.mesh import MeshJobRequest
from atelier3d.config import AppConfig
from atelier3d.errors import BadRequest
from atelier3d.imaging import decode_image
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.sources import SourceResolver, job_sources
from atelier3d.serve.jobs.types import Job, JobKind, streaming_kind
from atelier3d.serve.mesh.split import SplitMeshStream
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import Session
from atelier3d.stages.mesh import MeshRequest

# Share of a mesh job's time per stage, measured on the tiny and full pipelines: the diffusion
# steps and the volume decode dominate; texture projection is cheap, painting is not.
MESH_STAGES = {"conditioning": 0.05, "denoise": 0.45, "volume_decode": 0.25,
               "mesh_extraction": 0.1, "postprocess": 0.1, "texture": 0.05}
PARAMS = ("seed", "steps", "guidance_scale", "octree_resolution", "num_chunks",
          "target_face_count", "texture")


def mesh_kind(config: AppConfig, shape3d, mesh_finish=None) -> JobKind:
    """Mesh jobs as the config says: both halves on Shape3D (``mesh.stages: single``, or
    without a MeshFinish), or the second on MeshFinish (``split``)."""
    settings = config.jobs.mesh
    if config.mesh.stages == "split" and mesh_finish is not None:
        return JobKind("mesh", settings,
                       lambda request: SplitMeshStream(shape3d, mesh_finish, request), MESH_STAGES)
    return streaming_kind("mesh", settings, shape3d, "generate", MESH_STAGES)


class MeshService:
    def __init__(self, segmentation: SegmentService, jobs: JobService,
                 resolver: SourceResolver, shape3d, mesh_finish=None) -> None:
        self.segmentation = segmentation
        self.config: AppConfig = segmentation.config
        self.store = segmentation.store
        self.jobs = jobs
        self.resolver = resolver
        jobs.register(mesh_kind(self.config, shape3d, mesh_finish))

    async def _with_alpha(self, image: np.ndarray) -> np.ndarray:
        """RGBA as is; RGB gets SAM's cut-out of its main object first."""
        if image.shape[2] == 4:
            return image
        mask = await self.segmentation.auto_mask(image)
        return np.dstack([image, mask.astype(np.uint8) * 255])

    def _full_frame(self, session: Session, name: str, source: ImageSource) -> np.ndarray:
        """A part as an image-sized RGBA, so every part of a layered asset shares one frame."""
        if source.kind not in ("object", "part"):
            raise BadRequest(f"part {name!r}: layered parts must be objects or parse parts of "
                             "the session's image, so they line up")
        h, w = session.size
        frame = np.zeros((h, w, 4), np.uint8)
        if source.kind == "object":
            mask = self.segmentation.source_mask(
                session, MaskSource(object_id=source.object_id), "segment the object first")
            frame[..., :3], frame[..., 3] = session.image, mask.astype(np.uint8) * 255
            return frame
        part, completed = self.resolver.part(session, source)
        rgba = completed if source.completed and completed is not None else part.rgba
        x0, y0, x1, y1 = part.box
        frame[y0:y1, x0:x1] = rgba[: y1 - y0, : x1 - x0]
        return frame

    async def request(self, body: MeshJobRequest, upload: bytes | None,
                      session: Session | None = None) -> MeshRequest:
        params = {k: getattr(body, k) for k in PARAMS if getattr(body, k) is not None}
        if upload is not None:
            limits = self.config.limits
            image = await asyncio.to_thread(decode_image, upload, limits.max_pixels,
                                            keep_alpha=True,
                                            max_aspect_ratio=limits.max_aspect_ratio)
            if image.shape[2] != 4:
                # A session source without alpha is cut out with SAM (its session has the
                # embedding machinery); a bare upload must say what the object is itself.
                raise BadRequest("the uploaded image has no alpha channel: send a cut-out "
                                 "(RGBA PNG), or upload it as a session and name an object")
            return MeshRequest.build(image=image, **params)
        if body.session_id is None:
            raise BadRequest("give a session_id (and a source), or upload an image")
        session = session or await self.store.load(body.session_id)
        if body.parts:
            parts = [(p.name, self._full_frame(session, p.name, p.source)) for p in body.parts]
            return MeshRequest.build(parts=parts, **params)
        image = self.resolver.image(session, body.source)
        return MeshRequest.build(image=await self._with_alpha(image), **params)

    async def submit(self, body: MeshJobRequest, client: str, idempotency_key: str | None = None,
                     upload: bytes | None = None) -> Job:
        session = (await self.store.load(body.session_id)
                   if body.session_id and upload is None else None)
        payload = body.model_dump()
        if upload is not None:
            payload["upload_sha256"] = hashlib.sha256(upload).hexdigest()

        async def build() -> MeshRequest:
            if session is not None:
                sources = [body.source, *(p.source for p in body.parts or [])]
                await self.jobs.prefetch(session, job_sources(sources))
            return await self.request(body, upload, session)

        return await self.jobs.submit("mesh", build, payload, session=session, client=client,
                                      idempotency_key=idempotency_key)
