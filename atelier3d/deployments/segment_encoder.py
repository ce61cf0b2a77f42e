"""SamEncoder: SAM's ViT image encoder in torch, batched, once per image."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from pydantic import Field
from ray import serve

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.deployments.user_config import TorchUserConfig
from atelier3d.metrics import observe_stage, report_gpu_memory
from atelier3d.models.loading import resolve_device, resolve_dtype, weights_label
from atelier3d.models.segment.sam import sam_checkpoint, sam_info
from atelier3d.pull_status import wait_for_weights

logger = logging.getLogger("ray.serve")


class EncoderUserConfig(TorchUserConfig):
    max_batch_size: int = Field(2, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)


# Until reconfigure: the batching the decorator below starts with.
DEFAULTS = EncoderUserConfig()


@serve.deployment(name="SamEncoder")
class SamEncoder:
    def __init__(self, config: dict) -> None:
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        cfg = AppConfig.model_validate(config)
        wait_for_weights(cfg.cache_path, ["sam"])  # a pull beside the server
        self.checkpoint = sam_checkpoint(cfg)
        self.device = torch.device(resolve_device("auto", "sam"))
        dtype = resolve_dtype(cfg.sam.encoder_dtype, self.device.type, on_cuda="bfloat16")
        self.autocast_dtype = None if dtype == torch.float32 else dtype
        self.model = self.checkpoint.build().to(self.device)
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        logger.info(
            "SamEncoder ready: %s on %s (%s), weights %s",
            self.checkpoint.model_type,
            self.device,
            str(dtype).removeprefix("torch."),
            weights_label(self.checkpoint.trained).upper(),
        )

    def reconfigure(self, user_config: dict) -> None:
        settings = EncoderUserConfig.model_validate(user_config or {})
        settings.apply_threads()
        self.encode.set_max_batch_size(settings.max_batch_size)
        self.encode.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def info(self) -> ModelInfo:
        return sam_info(self.checkpoint)

    def _preprocess(self, image: np.ndarray):
        """Exactly ``SamPredictor.set_image``: resize longest side, normalise, pad."""
        import torch

        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
        return self.model.preprocess(tensor[None])

    def _encode_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        start = time.perf_counter()
        batch = torch.cat([self._preprocess(image) for image in images])
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            features = self.model.image_encoder(batch)
        out = features.float().cpu().numpy()
        elapsed = time.perf_counter() - start
        logger.info("encoded %d image(s) in %.2fs", len(images), elapsed)
        observe_stage("encode", elapsed * 1000)
        report_gpu_memory("sam_encoder")
        return list(out[:, None])  # each (1, 256, 64, 64), the decoder's input shape

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s)
    async def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        # In a thread: the replica's event loop stays free for health checks and info().
        return await asyncio.to_thread(self._encode_batch, images)
