"""What the SAM encoder and decoder deployments share: finding the checkpoint, describing it."""

from __future__ import annotations

from atelier3d.config import AppConfig
from atelier3d.models.sam import SamCheckpoint, resolve_checkpoint
from atelier3d.serve.schemas import ModelInfo


def sam_checkpoint(cfg: AppConfig) -> SamCheckpoint:
    return resolve_checkpoint(cfg.sam.checkpoint, cfg.models, cfg.sam.model_type, cfg.cache_path)


def sam_info(checkpoint: SamCheckpoint) -> ModelInfo:
    return ModelInfo(
        model_type=checkpoint.model_type,
        weights="trained" if checkpoint.trained else "untrained",
        checkpoint_sha256=checkpoint.sha256,
    )
