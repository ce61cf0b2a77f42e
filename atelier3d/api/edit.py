"""Text-driven edit jobs."""

from __future__ import annotations

from pydantic import Field

from atelier3d.api.common import RLE, ApiModel, FiniteFloat, ImageSource


class EditJobRequest(ApiModel):
    session_id: str
    source: ImageSource = Field(default_factory=ImageSource)
    extra_sources: list[ImageSource] = Field(
        default_factory=list, max_length=2,
        description="more reference images (Qwen-Image-Edit-2509's multi-image edit)")
    preset: str = Field("free", description="full_body, t_pose, complete_occluded or free")
    prompt: str = Field("", max_length=2000, description="what to do; added to the preset's")
    negative_prompt: str | None = Field(None, max_length=2000)
    mask: RLE | None = Field(
        None, description="region of the source to repaint (source-sized); for "
        "complete_occluded on a part, the hidden region is used when omitted")
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = Field(None, description="default: the server's")
    true_cfg_scale: FiniteFloat | None = None
    width: int | None = Field(None, description="output size; default: the pipeline's")
    height: int | None = None
