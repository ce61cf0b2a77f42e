"""Shape3D: image-to-3D with Hunyuan3D-2 (hy3dgen), streamed as progress events.

``generate`` yields the events of ``atelier3d.deployments.streaming``: progress per stage
(``conditioning``, ``denoise`` per step, ``volume_decode``, ``mesh_extraction``, ``postprocess``
and ``texture`` in steps from inside each), the untextured mesh as the ``shape`` artifact
(GLB), then the textured GLB as the result. hy3dgen keeps per-call state on the pipeline
object (the scheduler's timesteps and step index): calls on one replica are serialised by a
lock, a cancelled one stops at its next step.

``shape`` is a job's accelerator half only (``mesh.stages: split``): its events up to
``mesh_extraction``, then a result whose ``surfaces`` is a reference to the raw surfaces in the
object store, for ``MeshFinish.finish`` (``atelier3d.deployments.mesh_finish``). The lock is
free as soon as the surfaces are extracted, so the next job's denoising starts while MeshFinish
cleans up this one. A job that paints finishes here (the paint pipeline is on this replica).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing

import ray
from ray import serve

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.deployments.streaming import JobModel, ProgressReporter
from atelier3d.models.loading import weights_label
from atelier3d.models.mesh.hunyuan3d import extract_surfaces, finish, generate, load_shape_pipeline
from atelier3d.stages.mesh import SURFACES, MeshRequest

SURFACES_HOLD_S = 600.0


class HeldRefs:
    """``ray.put`` whose reference this replica keeps for ``hold_s`` after handing it on.

    Ray can free an object put by a streaming generator and nested in one of its items before
    the reader's borrow is registered (a race in Ray's reference counting): MeshFinish would
    then find the surfaces deleted. Holding them here for longer than a job waits for MeshFinish
    closes that window; memory stays bounded by the meshes made within ``hold_s``.
    """

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._refs: deque[tuple[float, ray.ObjectRef]] = deque()

    def put(self, value: object) -> ray.ObjectRef:
        now = time.monotonic()
        while self._refs and now - self._refs[0][0] > self.hold_s:
            self._refs.popleft()
        ref = ray.put(value)
        self._refs.append((now, ref))
        return ref


@serve.deployment(name="Shape3D")
class Shape3D(JobModel):
    memory_label = "shape3d"
    weights = ("mesh", "paint")

    def load(self, cfg: AppConfig) -> str:
        self.settings = cfg.mesh
        self.surfaces = HeldRefs(SURFACES_HOLD_S)
        model = self.model = load_shape_pipeline(cfg.mesh, cfg.models, cfg.cache_path)
        note = f" ({model.texture_note})" if model.texture_note else ""
        return (f"{model.name} on {model.device} ({weights_label(model.trained).upper()}), "
                f"FlashVDM {'on' if model.flashvdm else 'off'}, texture {model.texture}{note}")

    def info(self) -> ModelInfo:
        """``model_type`` names the shape model, FlashVDM and the texturing that actually runs;
        ``note`` says why it projects where ``texture: auto`` would have painted."""
        flags = "+flashvdm" if self.model.flashvdm else ""
        digest = hashlib.sha256(self.model.weights_sha256().encode())
        digest.update(self.model.texture.encode())
        return ModelInfo(
            model_type=f"{self.model.name}{flags}+texture={self.model.texture}",
            weights=weights_label(self.model.trained),
            checkpoint_sha256=digest.hexdigest(),
            note=(f"colours are projected from the input view, not painted: "
                  f"{self.model.texture_note}" if self.model.texture_note else None),
        )

    async def generate(self, request: MeshRequest) -> AsyncIterator[dict]:
        work = self.stream(lambda reporter: generate(self.model, request, reporter, self.settings))
        async with aclosing(work) as events:
            async for event in events:
                yield event

    async def shape(self, request: MeshRequest) -> AsyncIterator[dict]:
        def work(reporter: ProgressReporter) -> dict:
            surfaces = extract_surfaces(self.model, request, reporter, self.settings)
            if surfaces.texture == "paint":
                return finish(surfaces, reporter, self.model)
            # Owned by this replica, and held by it for a while (``HeldRefs``)
            return {"media_type": SURFACES, "data": b"", "meta": {},
                    "surfaces": self.surfaces.put(surfaces)}

        async with aclosing(self.stream(work)) as events:
            async for event in events:
                yield event
