"""MeshFinish: the CPU half of a mesh job (clean-up, texture projection, GLB export).

Shape3D's ``shape`` runs the half that needs the accelerator (conditioning, denoising, volume
decoding, surface extraction) and hands over the raw surfaces as arrays in the object store; the
Gateway passes that reference here unread (``atelier3d.serve.mesh.split``). With the CPU half on
its own replicas, the accelerator's replica starts the next job's denoising while this one
cleans up the previous job's ~1 M-face surface. ``finish`` streams ``postprocess`` and ``texture``
progress, the untextured ``shape`` artifact and the textured GLB, as ``Shape3D.generate`` does
for the whole job; a cancelled job stops at its next step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from atelier3d.config import AppConfig
from atelier3d.deployments.streaming import JobModel
from atelier3d.models.mesh.hunyuan3d import Surfaces, finish


@serve.deployment(name="MeshFinish")
class MeshFinish(JobModel):
    memory_label = "mesh_finish"
    weights = ()  # no model: it works on what Shape3D hands over

    def load(self, cfg: AppConfig) -> str:
        return f"clean-up {cfg.mesh.postprocess}, texture projection, GLB export"

    async def finish(self, surfaces: Surfaces) -> AsyncIterator[dict]:
        """``surfaces`` comes from ``Shape3D.shape`` (Ray resolves the reference to it here)."""
        async with aclosing(self.stream(lambda reporter: finish(surfaces, reporter))) as events:
            async for event in events:
                yield event
