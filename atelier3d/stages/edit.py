"""What the edit stage's Gateway and its ImageEditor replicas both hold: presets, the request."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atelier3d.config import SIZE_MULTIPLE, EditSettings
from atelier3d.errors import BadRequest, Unprocessable, validation_message

# Images and references per edit: the first is edited, the others guide it (the Plus pipeline).
MAX_IMAGES = 3

MIN_IMAGE_SIDE = 16

# The pipelines rescale every input to ~1 MP at its own aspect ratio; beyond this the short side
# ends up a few latent patches wide.
MAX_ASPECT = 4.0

# Without a negative prompt the pipelines skip true CFG; Qwen's own examples pass a blank one.
BLANK_NEGATIVE = " "


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str = Field(description="the instruction; the user's text is appended to it")
    negative_prompt: str
    needs_mask: bool = False


PRESETS: dict[str, Preset] = {
    "full_body": Preset(
        prompt="Extend this half-body picture into a full-body picture of the same character, "
        "standing, seen from head to feet with both feet visible. Keep the face, hairstyle, "
        "clothing, colours and art style exactly as they are.",
        negative_prompt="cropped, cut-off legs, missing feet, extra limbs, deformed hands, "
        "changed face, changed clothing, blurry, low quality",
    ),
    "t_pose": Preset(
        prompt="Show the same character standing in a T-pose, front view facing the camera, "
        "arms stretched straight out to the sides at shoulder height, legs straight and slightly "
        "apart, the whole body visible, on a plain white background. Keep the identity, "
        "clothing, colours and art style unchanged.",
        negative_prompt="side view, back view, arms down, crossed arms, hands in pockets, "
        "occluded limbs, cropped, extra limbs, props, shadows, busy background, blurry",
    ),
    "complete_occluded": Preset(
        prompt="Complete the hidden part of this cut-out inside the masked region so that it "
        "continues naturally: same shape, material, texture, pattern, colour and lighting. Do "
        "not add any other object.",
        negative_prompt="hands, arms, hair, other objects, seams, visible edges, artifacts, "
        "blurry, background clutter",
        needs_mask=True,
    ),
    "free": Preset(prompt="", negative_prompt=BLANK_NEGATIVE),
}


def _rgb(image: np.ndarray, index: int) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] in (3, 4)):
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image))
        raise BadRequest(f"image {index} must be (H, W, 3|4) uint8 RGB(A), got {shape} {dtype}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        raise Unprocessable(f"image {index} is {w}x{h}: sides of at least {MIN_IMAGE_SIDE} px "
                            f"and an aspect ratio of at most {MAX_ASPECT:g}:1 are supported")
    if image.shape[2] == 3:
        return image
    # The pipelines take RGB, and a transparent pixel's colour is arbitrary (often black, or what
    # the cut-out removed): composite on plain white, the background the presets ask for and the
    # one image-to-3D models expect behind a character.
    alpha = image[..., 3:].astype(np.float32) / 255.0
    return np.round(image[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


class EditRequest(BaseModel):
    """One edit of ``images[0]``: what the Gateway sends the ImageEditor.

    The fields are the user's; validation normalises them (RGBA composited on white, the mask as
    bool) and raises ``BadRequest``/``Unprocessable``. :meth:`check` adds the limits of a
    server's :class:`EditSettings`; :meth:`build` does both.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    images: list[np.ndarray] = Field(description="uint8 RGB(A); the first is edited")
    mask: np.ndarray | None = Field(None, description="bool (H, W) of images[0]: repaint this")
    preset: str = "free"
    prompt: str = ""
    negative_prompt: str | None = Field(None, description="default: the preset's")
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = Field(None, description="default: the server's")
    true_cfg_scale: float | None = Field(None, description="default: the server's")
    width: int | None = Field(None, description="output size; default: the pipeline's (~1 MP)")
    height: int | None = None

    @model_validator(mode="after")
    def _validate(self) -> EditRequest:
        if self.preset not in PRESETS:
            raise BadRequest(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        if not preset.prompt and not self.prompt.strip():
            raise BadRequest(f"the {self.preset!r} preset needs a prompt: say what to change")
        if not self.images:
            raise BadRequest("no image to edit")
        if len(self.images) > MAX_IMAGES:
            raise Unprocessable(f"{len(self.images)} images: at most {MAX_IMAGES} per edit")
        self.images = [_rgb(image, i) for i, image in enumerate(self.images)]
        self._validate_mask(preset)
        if (self.width is None) != (self.height is None):
            raise BadRequest("give both width and height, or neither")
        for name, side in (("width", self.width), ("height", self.height)):
            if side is not None and (side <= 0 or side % SIZE_MULTIPLE):
                raise Unprocessable(f"{name} {side} is not a positive multiple of {SIZE_MULTIPLE}")
        if self.steps is not None and self.steps < 1:
            raise Unprocessable(f"steps must be at least 1, got {self.steps}")
        if self.true_cfg_scale is not None and not 1.0 <= self.true_cfg_scale <= 20.0:
            raise Unprocessable(f"true_cfg_scale must be in [1, 20], got {self.true_cfg_scale}")
        return self

    def _validate_mask(self, preset: Preset) -> None:
        if self.mask is None:
            if preset.needs_mask:
                raise BadRequest(f"the {self.preset!r} preset needs a mask of the region to "
                                 "complete")
            return
        size = self.images[0].shape[:2]
        if not isinstance(self.mask, np.ndarray) or self.mask.shape != size:
            raise BadRequest(f"the mask is {getattr(self.mask, 'shape', None)}, the image is "
                             f"{size}: it must be (H, W) of the first image")
        self.mask = self.mask.astype(bool, copy=False)
        if not self.mask.any():
            raise BadRequest("the mask is empty: mark the region to repaint")
        if len(self.images) > 1:
            raise Unprocessable("a masked edit takes one image (no reference images)")
        if self.width is not None:
            # QwenImageEditInpaintPipeline ignores height/width: the result has the image's
            # aspect ratio at ~1 MP.
            raise Unprocessable("a masked edit's size follows the image: leave width and height "
                                "unset")

    def check(self, settings: EditSettings) -> EditRequest:
        """Raises ``Unprocessable`` where the request exceeds ``settings``' limits."""
        if len(self.images) > 1 and settings.multi_image_model is None:
            raise Unprocessable(
                f"this server edits one image at a time: {settings.model} was not trained for "
                "reference images (extra_sources) and no model that was is configured "
                "(edit.plus_model, e.g. Qwen/Qwen-Image-Edit-2509); send the edit without "
                "extra_sources")
        if self.steps is not None and self.steps > settings.max_steps:
            raise Unprocessable(f"steps {self.steps} > {settings.max_steps}, this server's limit")
        for name, side in (("width", self.width), ("height", self.height)):
            if side is not None and not settings.min_side <= side <= settings.max_side:
                raise Unprocessable(f"{name} {side} is outside {settings.min_side}.."
                                    f"{settings.max_side}, this server's output sizes")
        return self

    @classmethod
    def build(cls, settings: EditSettings | None = None, **fields) -> EditRequest:
        """The validated request (4xx ``ApiError`` otherwise), checked against ``settings``
        (default: the default :class:`EditSettings`)."""
        try:
            request = cls(**fields)
        except ValidationError as exc:  # wrong types: the ApiErrors above pass through pydantic
            raise BadRequest(validation_message(exc.errors(), "invalid edit request: ")) from None
        return request.check(settings or EditSettings())

    @property
    def full_prompt(self) -> str:
        return " ".join(p for p in (PRESETS[self.preset].prompt, self.prompt.strip()) if p)

    @property
    def full_negative_prompt(self) -> str:
        if self.negative_prompt is not None and self.negative_prompt.strip():
            return self.negative_prompt
        return PRESETS[self.preset].negative_prompt

    def pipeline(self, plus_for_single_image: bool = False) -> Literal["edit", "inpaint", "plus"]:
        """Which Qwen-Image-Edit pipeline serves this request."""
        if self.mask is not None:
            return "inpaint"
        return "plus" if len(self.images) > 1 or plus_for_single_image else "edit"
