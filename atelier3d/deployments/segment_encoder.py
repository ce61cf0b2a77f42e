"""SamEncoder: SAM's ViT image encoder in torch, batched, once per image."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from pydantic import BaseModel, Field
from ray import serve

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.metrics import observe_stage, report_gpu_memory
from atelier3d.models.segment.sam import sam_checkpoint, sam_info

logger = logging.getLogger("ray.serve")


class EncoderUserConfig(BaseModel):
    """Runtime knobs from the Serve YAML's ``user_config`` (changeable without a restart)."""

    max_batch_size: int = Field(2, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # On a 2-core box the encoder gets one core so a decoder click never waits for its threads.
    torch_threads: int = Field(1, ge=1)


@serve.deployment(name="SamEncoder")
class SamEncoder:
    def __init__(self, config: dict) -> None:
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        cfg = AppConfig.model_validate(config)
        self.checkpoint = sam_checkpoint(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = cfg.sam.encoder_dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.model = self.checkpoint.build().to(self.device)
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        logger.info(
            "SamEncoder ready: %s on %s (%s), weights %s",
            self.checkpoint.model_type,
            self.device,
            dtype,
            "trained" if self.checkpoint.trained else "UNTRAINED",
        )

    def reconfigure(self, user_config: dict) -> None:
        import torch

        settings = EncoderUserConfig.model_validate(user_config or {})
        torch.set_num_threads(settings.torch_threads)
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

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        # In a thread: the replica's event loop stays free for health checks and info().
        return await asyncio.to_thread(self._encode_batch, images)
