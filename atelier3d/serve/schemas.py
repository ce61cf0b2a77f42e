"""Pydantic models of the HTTP API v1: the contract programs and the UI share."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from atelier3d.checks import Check
from atelier3d.models.pose import Keypoint


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RLE(_Model):
    """COCO run-length encoding; ``counts`` is the compressed string (or raw run lengths)."""

    size: tuple[int, int] = Field(description="[height, width]")
    counts: str | list[int]


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Point = tuple[FiniteFloat, FiniteFloat]


class SessionInfo(_Model):
    session_id: str
    width: int
    height: int
    embedding: Literal["pending", "ready", "failed"]
    objects: list[str] = Field(default_factory=list)
    expires_in_s: float


class MaskCandidate(_Model):
    rle: RLE
    score: float = Field(description="SAM's predicted IoU")
    bbox: tuple[int, int, int, int] = Field(description="[x, y, width, height]")
    area: int


class SegmentRequest(_Model):
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


class Timings(_Model):
    wait_embedding_ms: float
    decode_ms: float
    total_ms: float


class SegmentResponse(_Model):
    masks: list[MaskCandidate]
    selected: int = Field(description="index of the best-scoring candidate (or the chosen one)")
    object_id: str | None = None
    step: int | None = Field(None, description="history position of this result in the object")
    timings_ms: Timings


class ObjectState(_Model):
    object_id: str
    step: int = Field(description="number of steps in effect (0 = empty)")
    can_undo: bool
    can_redo: bool
    points: list[Point]
    labels: list[int]
    box: tuple[float, float, float, float] | None
    masks: list[MaskCandidate]
    selected: int | None


class SelectRequest(_Model):
    index: int = Field(ge=0)


class MaskSource(_Model):
    """A mask given either as RLE or as an object (its selected candidate): exactly one."""

    rle: RLE | None = None
    object_id: str | None = Field(None, description="use this object's selected mask")

    @model_validator(mode="after")
    def _one_source(self) -> MaskSource:
        if (self.rle is None) == (self.object_id is None):
            raise ValueError("give exactly one of rle or object_id")
        return self


class CutoutRequest(MaskSource):
    background: Literal["transparent", "white", "black"] = "transparent"
    crop: bool = Field(True, description="crop to the mask's bounding box")


PartGroup = Literal["clothing", "hair", "body-skin"]


class ParseRequest(MaskSource):
    """Body and garment separation of one character: ``rle`` or ``object_id`` is its mask."""

    groups: list[PartGroup] | None = Field(
        None, description="merged parts cut out besides one per garment label "
        "(default: the server's, all three)"
    )
    complete_occlusions: bool | None = Field(
        None, description="also fill what hair and arms hide of each garment (default: the "
        "server's, on)"
    )


class ParsePart(_Model):
    name: str = Field(description="an ATR label (a garment) or a group name")
    labels: list[str] = Field(description="the ATR labels the part is made of")
    bbox: tuple[int, int, int, int] = Field(description="[x, y, width, height] in the image")
    url: str = Field(description="RGBA cut-out, cropped to bbox")
    completed_url: str | None = Field(
        None, description="the cut-out with its occluded part filled in, when something hid it"
    )


class ParseTimings(_Model):
    parse_ms: float = Field(description="SegFormer on the character's box")
    pose_ms: float
    parts_ms: float = Field(description="RLEs, cut-outs and occlusion completion")
    total_ms: float = Field(description="the whole request, as the server saw it")


class ParseResponse(_Model):
    parse_id: str
    object_id: str | None = None
    labels: list[str] = Field(description="ATR labels present in the character (no background)")
    masks: dict[str, RLE] = Field(description="one mask per present label")
    keypoints: list[Keypoint] = Field(
        description="BlazePose's 33 keypoints in image pixels (empty without a pose model)"
    )
    parts: list[ParsePart]
    checks: list[Check] = Field(description="what an image-to-3D input needs, passed or not")
    parse_map_url: str = Field(description="the label map coloured with the ATR palette (PNG)")
    pose_map_url: str = Field(description="OpenPose-style skeleton on black (PNG)")
    zip_url: str = Field(description="every cut-out (and completed version) in one ZIP")
    timings_ms: ParseTimings


class ErrorBody(_Model):
    code: str
    message: str
    retryable: bool | None = Field(
        None, description="a failed job's error: true when the same request may succeed if "
        "submitted again (its replica was lost)")


class ErrorResponse(_Model):
    error: ErrorBody


# ---- jobs (edit, mesh) ------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ImageSource(_Model):
    """Where a job's input image comes from, within its session.

    ``original``: the uploaded image. ``object``: an object's cut-out (RGBA, cropped to its mask
    with a margin). ``part``: a garment/part cut-out of a parse (``completed``: its version with
    the occluded part filled in). ``job``: the result of an earlier edit job of the same session.
    """

    kind: Literal["original", "object", "part", "job"] = "original"
    object_id: str | None = None
    parse_id: str | None = None
    part: str | None = None
    completed: bool = False
    job_id: str | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ImageSource:
        needed = {"original": (), "object": ("object_id",), "part": ("parse_id", "part"),
                  "job": ("job_id",)}[self.kind]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind!r} source needs {', '.join(missing)}")
        return self


class EditJobRequest(_Model):
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


class MeshPart(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\- ]+$")
    source: ImageSource


class MeshJobRequest(_Model):
    session_id: str | None = Field(None, description="needed unless the image is uploaded")
    source: ImageSource = Field(
        default_factory=lambda: ImageSource(kind="original"),
        description="an image with alpha (a cut-out); without alpha, SAM cuts the character "
        "out first")
    parts: list[MeshPart] | None = Field(
        None, max_length=16, description="layered asset: one mesh per part, one GLB with a "
        "node per part, aligned as in the image (replaces source)")
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = None
    guidance_scale: FiniteFloat | None = None
    octree_resolution: int | None = None
    num_chunks: int | None = None
    target_face_count: int | None = None
    texture: bool = True


class JobSubmitted(_Model):
    job_id: str
    status: JobStatus
    status_url: str
    events_url: str
    result_url: str


class JobArtifact(_Model):
    name: str
    media_type: str
    url: str
    meta: dict


class JobState(_Model):
    job_id: str
    kind: Literal["edit", "mesh"]
    session_id: str | None
    status: JobStatus
    stage: str | None = Field(None, description="what runs now (denoise, volume_decode, ...)")
    step: int = Field(0, description="steps of the stage done")
    total: int = Field(0, description="steps in the stage")
    progress: float = Field(description="0..1 over the whole job")
    queue_position: int | None = Field(None, description="jobs ahead of this one (queued only)")
    eta_s: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: ErrorBody | None = None
    artifacts: list[JobArtifact] = Field(
        default_factory=list, description="intermediate results (e.g. the untextured shape)")
    result_url: str | None = Field(None, description="set once the job succeeded")
    result_meta: dict | None = None
    stage_ms: dict[str, float] = Field(default_factory=dict)
    events_url: str


class ModelInfo(_Model):
    model_type: str
    weights: Literal["trained", "untrained"]
    checkpoint_sha256: str


class ReadyInfo(_Model):
    ready: bool
    weights: Literal["trained", "untrained"]
    models: dict[str, ModelInfo]


__all__ = [
    "RLE",
    "CutoutRequest",
    "EditJobRequest",
    "ImageSource",
    "JobArtifact",
    "JobState",
    "JobSubmitted",
    "MeshJobRequest",
    "MeshPart",
    "ErrorResponse",
    "MaskCandidate",
    "MaskSource",
    "ModelInfo",
    "ObjectState",
    "ParsePart",
    "ParseRequest",
    "ParseResponse",
    "ParseTimings",
    "ReadyInfo",
    "SegmentRequest",
    "SegmentResponse",
    "SelectRequest",
    "SessionInfo",
    "Timings",
]

