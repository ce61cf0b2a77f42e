"""ImageEditor: text-driven edits with Qwen-Image-Edit, streamed as progress events.

``edit(request)`` is a streaming method: the Gateway calls it with
``handle.options(stream=True).edit.remote(request)`` and reads ``progress`` events (stages
``encode``, ``denoise`` one per step, ``decode``) and then one ``result`` event with the PNG (see
``atelier3d.deployments.streaming``). One pipeline call runs at a time per replica: the pipelines
keep per-call state, and one call already uses every core or the whole GPU.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.deployments.streaming import JobModel
from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline, run_edit
from atelier3d.models.loading import weights_label
from atelier3d.stages.edit import EditRequest


@serve.deployment(name="ImageEditor")
class ImageEditor(JobModel):
    memory_label = "image_editor"
    weights = ("edit", "edit_plus", "lightning_lora")

    def load(self, cfg: AppConfig) -> str:
        pipes = self.pipes = load_edit_pipeline(cfg.edit, cfg.models, cfg.cache_path)
        lora = " + ".join(filter(None, (pipes.lora, pipes.plus_lora))) or "none"
        plus = pipes.plus_source or "refused (no model trained for them)"
        return (f"{pipes.name} on {pipes.device} ({weights_label(pipes.trained).upper()}), "
                f"quantization {pipes.quantization}, Lightning LoRA {lora}, multi-image edits "
                f"{plus}")

    def info(self) -> ModelInfo:
        quant = self.pipes.quantization
        return ModelInfo(
            model_type=f"{self.pipes.name}+{quant['transformer']}/{quant['text_encoder']}"
            + (f"+{self.pipes.lora}" if self.pipes.lora else ""),
            weights=weights_label(self.pipes.trained),
            checkpoint_sha256=self.pipes.weights_sha256,
        )

    async def edit(self, request: EditRequest) -> AsyncIterator[dict]:
        """Streams the edit's progress events, then its ``result`` (PNG bytes and meta)."""
        request.check(self.pipes.settings)  # it was built against the Gateway's settings
        async with aclosing(self.stream(lambda r: run_edit(self.pipes, request, r))) as events:
            async for event in events:
                yield event
