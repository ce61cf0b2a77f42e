"""Sessions, clicks and boxes, candidate masks, objects and their history, cut-outs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from atelier3d.api.common import RLE, ApiModel, FiniteFloat, MaskSource, Point


class SessionInfo(ApiModel):
    session_id: str
    width: int
    height: int
    embedding: Literal["pending", "ready", "failed"]
    objects: list[str] = Field(default_factory=list)
    expires_in_s: float


class MaskCandidate(ApiModel):
    rle: RLE
    score: float = Field(description="SAM's predicted IoU")
    bbox: tuple[int, int, int, int] = Field(description="[x, y, width, height]")
    area: int


class SegmentRequest(ApiModel):
    points: list[Point] = Field(default_factory=list, description="[[x, y], ...] in pixels")
    labels: list[Literal[0, 1]] = Field(
        default_factory=list, description="1 = foreground, 0 = background"
    )
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat] | None = Field(
        None, description="[x0, y0, x1, y1] in pixels"
    )
    mask_input: RLE | None = Field(None, description="a previous mask to refine, as RLE")
    refine: bool = Field(
        False, description="refine the object's selected mask (its low-res logits, as SAM does)"
    )
    multimask: bool = Field(True, description="3 candidates with scores, else one mask")
    object_id: str | None = Field(None, description="record the result in this object's history")

    @model_validator(mode="after")
    def _check_prompt(self) -> SegmentRequest:
        if len(self.points) != len(self.labels):
            raise ValueError(
                f"points and labels differ in length ({len(self.points)} vs {len(self.labels)})"
            )
        if not self.points and self.box is None:
            raise ValueError("give at least one point or a box")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if x1 <= x0 or y1 <= y0:
                raise ValueError("box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        if self.refine and self.mask_input is not None:
            raise ValueError("use either refine or mask_input, not both")
        if self.refine and self.object_id is None:
            raise ValueError("refine needs an object_id (its selected mask is refined)")
        return self


class Timings(ApiModel):
    wait_embedding_ms: float
    decode_ms: float
    total_ms: float


class SegmentResponse(ApiModel):
    masks: list[MaskCandidate]
    selected: int = Field(description="index of the best-scoring candidate (or the chosen one)")
    object_id: str | None = None
    step: int | None = Field(None, description="history position of this result in the object")
    timings_ms: Timings


class ObjectState(ApiModel):
    object_id: str
    step: int = Field(description="number of steps in effect (0 = empty)")
    can_undo: bool
    can_redo: bool
    points: list[Point]
    labels: list[int]
    box: tuple[float, float, float, float] | None
    masks: list[MaskCandidate]
    selected: int | None


class SelectRequest(ApiModel):
    index: int = Field(ge=0)


class CutoutRequest(MaskSource):
    background: Literal["transparent", "white", "black"] = "transparent"
    crop: bool = Field(True, description="crop to the mask's bounding box")


class RecordedCandidate(ApiModel):
    rle: RLE
    score: FiniteFloat = Field(description="SAM's predicted IoU, as the browser's decoder gave it")


class RecordStepRequest(ApiModel):
    """A step the browser decoded itself: its prompt and the candidates it chose from."""

    points: list[Point] = Field(default_factory=list, description="[[x, y], ...] in pixels")
    labels: list[Literal[0, 1]] = Field(default_factory=list)
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat] | None = None
    masks: list[RecordedCandidate] = Field(min_length=1, max_length=3)
    selected: int = Field(ge=0, description="index of the chosen candidate in masks")

    @model_validator(mode="after")
    def _check_step(self) -> RecordStepRequest:
        if len(self.points) != len(self.labels):
            raise ValueError(
                f"points and labels differ in length ({len(self.points)} vs {len(self.labels)})"
            )
        if not self.points and self.box is None:
            raise ValueError("give at least one point or a box")
        if self.selected >= len(self.masks):
            raise ValueError(f"selected {self.selected} but only {len(self.masks)} masks")
        return self


class DecoderGraph(ApiModel):
    url: str = Field(description="versioned by the graph's hash: cache it forever")
    sha256: str
    bytes: int


class DecoderGraphs(ApiModel):
    """The ONNX prompt decoder graphs the SamDecoder replicas run, for clients that decode."""

    multimask: DecoderGraph
    single: DecoderGraph
    embedding_dtype: Literal["float16"] = "float16"
    embedding_shape: tuple[int, int, int, int] = (1, 256, 64, 64)
