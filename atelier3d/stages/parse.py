"""What the parse stage's Gateway and its HumanParser replicas both hold.

The ATR labels and their colours, the parse result and its parts, the OpenPose-style pose map."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from atelier3d.api.parse import Check, Keypoint, Pose

# ids 0..17 in the order of the model card (ATR).
LABELS = (
    "Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress",
    "Belt", "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm", "Right-arm",
    "Bag", "Scarf",
)

LABEL_IDS = {name: i for i, name in enumerate(LABELS)}

BACKGROUND, HAT, HAIR, SUNGLASSES, UPPER_CLOTHES, SKIRT, PANTS, DRESS, BELT = range(9)

LEFT_SHOE, RIGHT_SHOE, FACE, LEFT_LEG, RIGHT_LEG, LEFT_ARM, RIGHT_ARM, BAG, SCARF = range(9, 18)

# What the person wears or carries (cut out as garments) and what is the person's own skin.
GARMENT_LABELS = (HAT, SUNGLASSES, UPPER_CLOTHES, SKIRT, PANTS, DRESS, BELT, LEFT_SHOE,
                  RIGHT_SHOE, BAG, SCARF)

SKIN_LABELS = (FACE, LEFT_ARM, RIGHT_ARM, LEFT_LEG, RIGHT_LEG)

# What typically lies in front of a garment in a frontal view, hiding part of it.
OCCLUDER_LABELS = (HAIR, LEFT_ARM, RIGHT_ARM)

GROUPS: dict[str, tuple[int, ...]] = {
    "clothing": GARMENT_LABELS,
    "hair": (HAIR,),
    "body-skin": SKIN_LABELS,
}

# One colour per label for overlays; background black. Adjacent ids differ strongly in hue.
PALETTE = np.array(
    [
        (0, 0, 0), (128, 0, 0), (255, 128, 0), (0, 0, 128), (220, 20, 60), (0, 128, 128),
        (0, 0, 255), (128, 0, 128), (255, 255, 0), (128, 64, 0), (64, 128, 0), (255, 200, 160),
        (0, 255, 0), (0, 160, 80), (0, 255, 255), (80, 160, 255), (255, 0, 255), (160, 160, 160),
    ],
    dtype=np.uint8,
)


def colorize(label_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` label ids -> ``(H, W, 3)`` RGB with :data:`PALETTE`."""
    return PALETTE[label_map]


@dataclass(frozen=True)
class Part:
    name: str  # an ATR label name, or a group name ("clothing", "hair", "body-skin")
    labels: tuple[int, ...]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in the full image
    rgba: np.ndarray  # (y1 - y0, x1 - x0, 4) uint8

    @property
    def region(self) -> np.ndarray:
        """The part's pixels (alpha > 0), in its crop."""
        return self.rgba[..., 3] > 0

    def crop(self, full: np.ndarray) -> np.ndarray:
        """A full-image array cut to this part's box (e.g. an occluder mask)."""
        x0, y0, x1, y1 = self.box
        return full[y0:y1, x0:x1]


@dataclass
class ParseResult:
    size: tuple[int, int]  # (H, W) of the image
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the region parsed
    label_map: np.ndarray  # (H, W) uint8 ATR ids, 0 outside the mask
    labels: list[str]  # present, background excluded
    rles: dict[str, dict]  # label name -> COCO RLE
    pose: Pose | None  # None when no pose model could be loaded
    checks: list[Check]
    parts: list[Part]  # RGBA cut-outs, one per garment label present, then the groups
    completed: dict[str, np.ndarray] = field(default_factory=dict)  # part name -> completed RGBA
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def keypoints(self) -> list[Keypoint]:
        return self.pose.keypoints if self.pose is not None else []


def hidden_region(part_rgba: np.ndarray, completed: np.ndarray | None) -> np.ndarray | None:
    """What a part's completed version adds (what hair or arms hid of it), in the part's crop:
    the region a ``complete_occluded`` edit of the part repaints unless given another. None when
    nothing was completed."""
    if completed is None or completed.shape[:2] != part_rgba.shape[:2]:
        return None
    hidden = (completed[..., 3] > 0) & (part_rgba[..., 3] == 0)
    return hidden if hidden.any() else None


# OpenPose's 18 body points, built from BlazePose's (neck = mid-shoulders), and its drawing
# conventions (limb pairs and colours as ControlNet's openpose annotator), so pose maps can
# condition OpenPose-trained generators.
OPENPOSE_FROM_BLAZEPOSE = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
    "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
    "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear",
)

OPENPOSE_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
                  (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))

OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)


def openpose_points(pose: Pose, min_confidence: float = 0.3) -> list[tuple[float, float] | None]:
    """The 18 OpenPose points (None where not confidently seen)."""
    def point(name: str) -> tuple[float, float] | None:
        if name == "neck":
            left, right = point("left_shoulder"), point("right_shoulder")
            return None if left is None or right is None else (
                (left[0] + right[0]) / 2, (left[1] + right[1]) / 2)
        k = pose[name]
        return (k.x, k.y) if k.confidence >= min_confidence else None

    return [point(name) for name in OPENPOSE_FROM_BLAZEPOSE]


def render_pose_map(
    keypoints: Pose | None, size: tuple[int, int], min_confidence: float = 0.3
) -> np.ndarray:
    """OpenPose-style coloured skeleton on black, ``(H, W, 3)`` uint8 RGB for ``size=(H, W)``."""
    import cv2

    height, width = size
    canvas = np.zeros((height, width, 3), np.uint8)
    if keypoints is None:
        return canvas
    points = openpose_points(keypoints, min_confidence)
    scale = max(height, width) / 512  # ControlNet draws 4 px limbs at 512 px
    stick, radius = max(1, round(4 * scale)), max(1, round(4 * scale))
    for (a, b), color in zip(OPENPOSE_LIMBS, OPENPOSE_COLORS, strict=False):
        if points[a] is None or points[b] is None:
            continue
        (xa, ya), (xb, yb) = points[a], points[b]
        length = math.hypot(xb - xa, yb - ya)
        angle = math.degrees(math.atan2(yb - ya, xb - xa))
        polygon = cv2.ellipse2Poly((round((xa + xb) / 2), round((ya + yb) / 2)),
                                   (round(length / 2), stick), round(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [round(c * 0.6) for c in color])
    for point, color in zip(points, OPENPOSE_COLORS, strict=True):
        if point is not None:
            cv2.circle(canvas, (round(point[0]), round(point[1])), radius, color, thickness=-1)
    return canvas
