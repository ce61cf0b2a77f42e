"""Shape3D: image-to-3D with Hunyuan3D-2 (hy3dgen), streamed as progress events.

``generate`` yields the events of ``atelier3d.deployments.streaming``: progress per stage
(``conditioning``, ``denoise`` per step, ``volume_decode``, ``mesh_extraction``, ``postprocess``,
``texture``), the untextured mesh as the ``shape`` artifact (GLB), then the textured GLB as the
result. hy3dgen keeps per-call state on the pipeline object (the scheduler's timesteps and step
index): calls on one replica are serialised by a lock, a cancelled one stops at its next step.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel, Field
from ray import serve

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.deployments.streaming import stream_blocking
from atelier3d.metrics import report_gpu_memory
from atelier3d.models.mesh.hunyuan3d import generate, load_shape_pipeline
from atelier3d.stages.mesh import MeshRequest

logger = logging.getLogger("ray.serve")


class Shape3DUserConfig(BaseModel):
    """Runtime knobs from the Serve YAML's ``user_config`` (changeable without a restart)."""

    torch_threads: int = Field(1, ge=1)


@serve.deployment(name="Shape3D")
class Shape3D:
    def __init__(self, config: dict) -> None:
        cfg = AppConfig.model_validate(config)
        self.settings = cfg.mesh
        self.model = load_shape_pipeline(cfg.mesh, cfg.models, cfg.cache_path)
        self._lock = threading.Lock()
        self.reconfigure({})  # usable without a user_config (and in-process, without Serve)
        logger.info(
            "Shape3D ready: %s on %s (%s), FlashVDM %s, texture %s%s",
            self.model.name, self.model.device, "trained" if self.model.trained else "UNTRAINED",
            "on" if self.model.flashvdm else "off", self.model.texture,
            f" ({self.model.texture_note})" if self.model.texture_note else "",
        )

    def reconfigure(self, user_config: dict) -> None:
        import torch

        settings = Shape3DUserConfig.model_validate(user_config or {})
        torch.set_num_threads(settings.torch_threads)

    def info(self) -> ModelInfo:
        """``model_type`` names the shape model, FlashVDM and the texturing that actually runs."""
        flags = "+flashvdm" if self.model.flashvdm else ""
        digest = hashlib.sha256(self.model.weights_sha256().encode())
        digest.update(self.model.texture.encode())
        return ModelInfo(
            model_type=f"{self.model.name}{flags}+texture={self.model.texture}",
            weights="trained" if self.model.trained else "untrained",
            checkpoint_sha256=digest.hexdigest(),
        )

    async def generate(self, request: MeshRequest) -> AsyncIterator[dict]:
        # aclosing: a cancelled or closed stream ends the worker's stream (and so the job) at
        # once, not whenever the inner generator is garbage-collected.
        work = stream_blocking(
            lambda reporter: generate(self.model, request, reporter, self.settings), self._lock)
        async with aclosing(work) as events:
            async for event in events:
                yield event
        report_gpu_memory("shape3d")
