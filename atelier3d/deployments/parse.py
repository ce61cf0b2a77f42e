"""HumanParser: SegFormer human parsing + BlazePose keypoints for one cut-out character.

Given the image and the character's mask (from SAM), it parses the mask's box (plus a margin) at
the model's resolution, keeps labels inside the mask only, finds the pose in the same box, and
returns everything in full-image coordinates: the label map and its per-label RLEs, keypoints,
garment/hair/skin cut-outs (with occlusions completed classically) and the pre-3D checks.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Literal

import numpy as np
from pydantic import Field
from ray import serve

from atelier3d import rle
from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.deployments.user_config import TorchUserConfig
from atelier3d.errors import BadRequest
from atelier3d.imaging import crop_with_margin
from atelier3d.metrics import observe_stage, report_gpu_memory
from atelier3d.models.loading import resolve_device, weights_label
from atelier3d.models.parse.checks import run_checks
from atelier3d.models.parse.garments import complete_parts, extract_parts
from atelier3d.models.parse.pose import load_pose
from atelier3d.models.parse.segformer import load_parser, parse
from atelier3d.pull_status import wait_for_weights
from atelier3d.stages.parse import GARMENT_LABELS, LABELS, ParseResult

logger = logging.getLogger("ray.serve")


class ParserUserConfig(TorchUserConfig):
    crop_margin: float = Field(0.1, ge=0, le=1, description="of the mask box's longer side")
    feather_px: int = Field(2, ge=0, le=32, description="alpha ramp inside each part's edge")
    groups: list[Literal["clothing", "hair", "body-skin"]] = Field(
        default_factory=lambda: ["clothing", "hair", "body-skin"],
        description="merged parts cut out besides one part per garment label",
    )
    complete_occlusions: bool = True
    hull: Literal["convex", "close"] = "convex"
    close_px: int = Field(15, ge=1, le=128)


def _validate(image: np.ndarray, mask: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
            and image.dtype == np.uint8 and image.size):
        raise BadRequest("the image must be an (H, W, 3) uint8 RGB array")
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        shape = getattr(mask, "shape", None)
        raise BadRequest(f"the mask is {shape}, the image is {image.shape[:2]}")
    mask = mask.astype(bool)
    if not mask.any():
        raise BadRequest("the mask is empty: select the character first")
    if labels is not None and (
        not isinstance(labels, np.ndarray) or labels.shape != mask.shape
        or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
        or labels.max() >= len(LABELS)
    ):
        raise BadRequest(f"a label map must be (H, W) integers in 0..{len(LABELS) - 1}")
    return mask


@serve.deployment(name="HumanParser")
class HumanParser:
    def __init__(self, config: dict) -> None:
        cfg = AppConfig.model_validate(config)
        wait_for_weights(cfg.cache_path, ["segformer", "pose"])  # a pull beside the server
        settings = cfg.parsing
        device = resolve_device(settings.device, "parsing.device")
        self.parser = load_parser(settings.segformer, cfg.models, cfg.cache_path, device)
        self.pose_source, self.models, self.cache = settings.pose, cfg.models, cfg.cache_path
        self.pose = None
        self.settings = ParserUserConfig()
        self.reconfigure({})  # usable without a user_config (and in-process, without Serve)
        logger.info(
            "HumanParser ready: %s on %s (%s), pose %s",
            self.parser.name, device, weights_label(self.parser.trained).upper(),
            self.pose.weights.variant if self.pose else "UNAVAILABLE",
        )

    def reconfigure(self, user_config: dict) -> None:
        settings = ParserUserConfig.model_validate(user_config or {})
        settings.apply_threads()
        if self.pose is None or self.pose.num_threads != settings.torch_threads:
            self.pose = load_pose(self.pose_source, self.models, self.cache,
                                  settings.torch_threads)
        self.settings = settings

    def info(self) -> ModelInfo:
        pose = self.pose.weights if self.pose else None
        digest = hashlib.sha256(self.parser.weights_sha256().encode())
        digest.update((pose.sha256 if pose else "no-pose").encode())
        return ModelInfo(
            model_type=f"{self.parser.name}+{pose.variant if pose else 'no-pose'}",
            weights=weights_label(self.parser.trained and pose is not None),
            checkpoint_sha256=digest.hexdigest(),
        )

    def parse(self, image: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None,
              groups: list[str] | None = None,
              complete_occlusions: bool | None = None) -> ParseResult:
        """Parses the character under ``mask``; ``labels`` (e.g. a map the user corrected)
        replaces SegFormer's when given. ``groups`` and ``complete_occlusions`` override the
        user_config's for this call."""
        mask = _validate(image, mask, labels)
        overrides = {"groups": groups, "complete_occlusions": complete_occlusions}
        settings = ParserUserConfig.model_validate(
            self.settings.model_dump() | {k: v for k, v in overrides.items() if v is not None})
        box = crop_with_margin(mask, settings.crop_margin)
        x0, y0, x1, y1 = box
        timings = {}

        start = time.perf_counter()
        if labels is None:
            label_map = np.zeros(mask.shape, np.uint8)
            label_map[y0:y1, x0:x1] = parse(self.parser.model, self.parser.processor,
                                            np.ascontiguousarray(image[y0:y1, x0:x1]))
        else:
            label_map = labels.astype(np.uint8)
        label_map[~mask] = 0  # the parse of anything outside the character is not the character's
        timings["parse_ms"] = (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        pose = self.pose.estimate(image, box) if self.pose is not None else None
        timings["pose_ms"] = (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        present = [int(i) for i in np.unique(label_map) if i != 0]
        encoded = rle.encode(np.stack([label_map == i for i in present])) if present else []
        parts = extract_parts(image, label_map, mask, groups=settings.groups,
                              feather_px=settings.feather_px)
        completed = {}
        if settings.complete_occlusions:
            # Single garments only: the hull of a merged group (or of skin) spans the gaps between
            # its pieces, where arms legitimately are.
            garments = [p for p in parts if len(p.labels) == 1 and p.labels[0] in GARMENT_LABELS]
            completed = complete_parts(garments, label_map, method=settings.hull,
                                       close_px=settings.close_px,
                                       feather_px=settings.feather_px)
        timings["parts_ms"] = (time.perf_counter() - start) * 1000
        observe_stage("parse", timings["parse_ms"] + timings["pose_ms"])
        report_gpu_memory("human_parser")

        return ParseResult(
            size=mask.shape,
            box=box,
            label_map=label_map,
            labels=[LABELS[i] for i in present],
            rles={LABELS[i]: r for i, r in zip(present, encoded, strict=True)},
            pose=pose,
            checks=run_checks(image, mask, label_map, pose),
            parts=parts,
            completed=completed,
            timings_ms=timings,
        )
