"""A mesh job across its two deployments, read by the job runner as one stream.

``mesh.stages: split``: Shape3D's ``shape`` streams the accelerator half's events and ends with a
result naming the raw surfaces in the object store (``SURFACES``); MeshFinish's ``finish`` takes
that reference (Ray hands it the arrays; the Gateway never reads them) and streams the rest:
``postprocess``, the untextured ``shape`` artifact, ``texture``, the GLB. A job that paints ends
with its GLB on Shape3D. ``cancel()`` cancels whichever call is running, so a job cancels the
same way in either half; a replica lost in either half runs the whole job again (the runner).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from atelier3d.stages.mesh import SURFACES


class SplitMeshStream:
    def __init__(self, shape3d: DeploymentHandle, mesh_finish: DeploymentHandle,
                 request: Any) -> None:
        self._shape3d, self._mesh_finish = shape3d, mesh_finish
        self._call: Any = None  # the running DeploymentResponseGenerator
        self._events = self._both_halves(request)

    async def _both_halves(self, request: Any) -> AsyncIterator[dict]:
        surfaces = None
        self._call = self._shape3d.options(stream=True).shape.remote(request)
        async for event in self._call:
            if event.get("type") == "result" and event.get("media_type") == SURFACES:
                surfaces = event["surfaces"]
            else:
                yield event
        if surfaces is None:  # finished on Shape3D (painted)
            return
        self._call = self._mesh_finish.options(stream=True).finish.remote(surfaces)
        del surfaces  # the call holds the reference now
        async for event in self._call:
            yield event

    def __aiter__(self) -> SplitMeshStream:
        return self

    async def __anext__(self) -> dict:
        return await anext(self._events)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
