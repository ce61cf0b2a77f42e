"""Body and garment separation: the parse of a character, its pose and its pre-3D checks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from atelier3d.api.common import RLE, ApiModel, MaskSource


class Check(BaseModel):
    name: str
    passed: bool
    reason: str
    suggestion: str


KEYPOINT_NAMES = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel",
    "right_heel", "left_foot_index", "right_foot_index",
)

KEYPOINT_IDS = {name: i for i, name in enumerate(KEYPOINT_NAMES)}


class Keypoint(BaseModel):
    name: str
    x: float  # pixels in the image given to ``estimate``
    y: float
    confidence: float  # BlazePose "visibility": in the image and not occluded
    presence: float  # BlazePose "presence": in the image at all


class Pose(BaseModel):
    score: float  # the landmark model's "a pose is in this ROI" probability
    keypoints: list[Keypoint]

    def __getitem__(self, name: str) -> Keypoint:
        return self.keypoints[KEYPOINT_IDS[name]]

    def shifted(self, dx: float, dy: float) -> Pose:
        moved = [k.model_copy(update={"x": k.x + dx, "y": k.y + dy}) for k in self.keypoints]
        return Pose(score=self.score, keypoints=moved)


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


class ParsePart(ApiModel):
    name: str = Field(description="an ATR label (a garment) or a group name")
    labels: list[str] = Field(description="the ATR labels the part is made of")
    bbox: tuple[int, int, int, int] = Field(description="[x, y, width, height] in the image")
    url: str = Field(description="RGBA cut-out, cropped to bbox")
    completed_url: str | None = Field(
        None, description="the cut-out with its occluded part filled in, when something hid it"
    )
    hidden: RLE | None = Field(
        None, description="what the completed version adds, sized like the cut-out: the region "
        "a complete_occluded edit of this part repaints when sent without a mask (send a changed "
        "one as the edit's mask to repaint another)")


class ParseTimings(ApiModel):
    parse_ms: float = Field(description="SegFormer on the character's box")
    pose_ms: float
    parts_ms: float = Field(description="RLEs, cut-outs and occlusion completion")
    total_ms: float = Field(description="the whole request, as the server saw it")


class ParseResponse(ApiModel):
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
