"""ImageEditor: text-driven edits with Qwen-Image-Edit, streamed as progress events.

``edit(request)`` is a streaming method: the Gateway calls it with
``handle.options(stream=True).edit.remote(request)`` and reads ``progress`` events (stages
``encode``, ``denoise`` one per step, ``decode``) and then one ``result`` event with the PNG (see
``atelier3d.deployments.streaming``). One pipeline call runs at a time per replica: the pipelines
keep per-call state, and one call already uses every core or the whole GPU.
"""

from __future__ import annotations

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
from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline, run_edit
from atelier3d.stages.edit import EditRequest

logger = logging.getLogger("ray.serve")


class EditorUserConfig(BaseModel):
    """Runtime knobs from the Serve YAML's ``user_config`` (changeable without a restart)."""

    torch_threads: int = Field(1, ge=1)


@serve.deployment(name="ImageEditor")
class ImageEditor:
    def __init__(self, config: dict) -> None:
        cfg = AppConfig.model_validate(config)
        self.pipes = load_edit_pipeline(cfg.edit, cfg.models, cfg.cache_path)
        self._lock = threading.Lock()
        self.reconfigure({})  # usable without a user_config (and in-process, without Serve)
        pipes = self.pipes
        logger.info("ImageEditor ready: %s on %s (%s), quantization %s, Lightning LoRA %s, "
                    "multi-image edits %s", pipes.name, pipes.device,
                    "trained" if pipes.trained else "UNTRAINED", pipes.quantization,
                    " + ".join(filter(None, (pipes.lora, pipes.plus_lora))) or "none",
                    pipes.plus_source or "refused (no model trained for them)")

    def reconfigure(self, user_config: dict) -> None:
        import torch

        torch.set_num_threads(EditorUserConfig.model_validate(user_config or {}).torch_threads)

    def info(self) -> ModelInfo:
        quant = self.pipes.quantization
        return ModelInfo(
            model_type=f"{self.pipes.name}+{quant['transformer']}/{quant['text_encoder']}"
            + (f"+{self.pipes.lora}" if self.pipes.lora else ""),
            weights="trained" if self.pipes.trained else "untrained",
            checkpoint_sha256=self.pipes.weights_sha256,
        )

    async def edit(self, request: EditRequest) -> AsyncIterator[dict]:
        """Streams the edit's progress events, then its ``result`` (PNG bytes and meta)."""
        request.check(self.pipes.settings)  # it was built against the Gateway's settings
        events = stream_blocking(lambda r: run_edit(self.pipes, request, r), self._lock)
        # Closing this stream (a cancelled job) closes the inner one at once, which stops the
        # pipeline at its next step and frees the lock, instead of whenever it is collected.
        async with aclosing(events):
            async for event in events:
                yield event
        report_gpu_memory("image_editor")
