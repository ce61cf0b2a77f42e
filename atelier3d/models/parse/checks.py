"""Checks before image-to-3D, from the pose and the parse map: each says what is wrong and what to
do about it (usually an edit step: extend to full body, turn to a frontal T-pose, cut out).

Image-to-3D models are trained on whole, frontal characters in a T/A-pose on a plain background;
each check catches one way an input falls short of that.
"""

from __future__ import annotations

import math

import numpy as np

from atelier3d.api.parse import Check, Keypoint, Pose
from atelier3d.stages import parse as atr

MIN_CONFIDENCE = 0.5

FULL_BODY_KEYPOINTS = ("nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip",
                       "left_knee", "right_knee", "left_ankle", "right_ankle")

MIN_SHOULDER_TO_TORSO = 0.4  # shoulder width / shoulder-hip height; side views fall far below

MIN_FACE_SHARE = 0.2  # face / (face + hair) pixels; a back view shows almost only hair

ARM_ANGLE_RANGE = (25.0, 115.0)  # upper arm vs torso, degrees: A-pose ~30-50, T-pose ~90

MIN_ELBOW_ANGLE = 140.0  # a straight arm is 180

BACKGROUND_TOLERANCE = 40.0  # RGB distance from the background's median colour

MIN_PLAIN_BACKGROUND = 0.9  # share of background pixels within that tolerance


def _seen(pose: Pose, name: str, shape: tuple[int, int]) -> Keypoint | None:
    k = pose[name]
    inside = 0 <= k.x < shape[1] and 0 <= k.y < shape[0]
    return k if inside and k.confidence >= MIN_CONFIDENCE else None


def full_body_visible(mask: np.ndarray, label_map: np.ndarray, pose: Pose | None) -> Check:
    problems = []
    present = set(np.unique(label_map[mask]).tolist())
    if not present & {atr.FACE, atr.HAIR, atr.HAT}:
        problems.append("no head in the parse map")
    if not present & {atr.LEFT_SHOE, atr.RIGHT_SHOE, atr.LEFT_LEG, atr.RIGHT_LEG}:
        problems.append("no legs or feet in the parse map")
    cut = [side for side, edge in (("top", mask[0]), ("bottom", mask[-1])) if edge.any()]
    if cut:
        problems.append(f"the figure is cut off at the image's {' and '.join(cut)}")
    if pose is not None:
        missing = [n for n in FULL_BODY_KEYPOINTS if _seen(pose, n, mask.shape) is None]
        if missing:
            problems.append("not visible: " + ", ".join(n.replace("_", " ") for n in missing))
    basis = "pose and parse map" if pose is not None else "parse map only (no pose model)"
    return Check(
        name="full_body_visible",
        passed=not problems,
        reason="; ".join(problems) or f"head to feet in view ({basis})",
        suggestion="" if not problems else
        "use an image showing the whole figure, or extend it to full body in the edit step",
    )


def facing_front(label_map: np.ndarray, pose: Pose | None) -> Check:
    problems = []
    face = int(np.count_nonzero(label_map == atr.FACE))
    hair = int(np.count_nonzero(label_map == atr.HAIR))
    if face + hair and face / (face + hair) < MIN_FACE_SHARE:
        problems.append(f"the face is only {face / (face + hair):.0%} of the head (back view?)")
    if pose is not None:
        left = _seen(pose, "left_shoulder", label_map.shape)
        right = _seen(pose, "right_shoulder", label_map.shape)
        hips = [_seen(pose, n, label_map.shape) for n in ("left_hip", "right_hip")]
        if left is None or right is None:
            problems.append("shoulders not visible")
        else:
            if left.x <= right.x:
                problems.append("the left shoulder is on the image's left: seen from behind")
            if all(hips):
                torso = abs((hips[0].y + hips[1].y) / 2 - (left.y + right.y) / 2)
                ratio = abs(left.x - right.x) / max(torso, 1.0)
                if ratio < MIN_SHOULDER_TO_TORSO:
                    problems.append(f"shoulders {ratio:.2f} of the torso height apart: side view")
    return Check(
        name="facing_front",
        passed=not problems,
        reason="; ".join(problems) or "facing the viewer",
        suggestion="" if not problems else "turn the character to a front view in the edit step",
    )


def _angle(a: Keypoint, b: Keypoint, c: Keypoint) -> float:
    """The angle at ``b`` between ``b->a`` and ``b->c``, degrees."""
    v1 = np.array([a.x - b.x, a.y - b.y])
    v2 = np.array([c.x - b.x, c.y - b.y])
    cos = v1 @ v2 / max(np.linalg.norm(v1) * np.linalg.norm(v2), 1e-9)
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def t_or_a_pose(shape: tuple[int, int], pose: Pose | None) -> Check:
    suggestion = "turn the character to a front T-pose in the edit step"
    if pose is None:
        return Check(name="t_or_a_pose", passed=False, reason="no pose model: not evaluated",
                     suggestion="install the pose models (see the parsing settings)")
    problems = []
    for side in ("left", "right"):
        shoulder, elbow, wrist, hip = (_seen(pose, f"{side}_{part}", shape)
                                       for part in ("shoulder", "elbow", "wrist", "hip"))
        if shoulder is None or elbow is None or hip is None:
            problems.append(f"{side} arm not visible")
            continue
        lift = _angle(hip, shoulder, elbow)
        low, high = ARM_ANGLE_RANGE
        if lift < low:
            problems.append(f"{side} arm hangs along the body ({lift:.0f} deg)")
        elif lift > high:
            problems.append(f"{side} arm raised above the shoulder ({lift:.0f} deg)")
        if wrist is not None and _angle(shoulder, elbow, wrist) < MIN_ELBOW_ANGLE:
            problems.append(f"{side} elbow bent ({_angle(shoulder, elbow, wrist):.0f} deg)")
    return Check(
        name="t_or_a_pose",
        passed=not problems,
        reason="; ".join(problems) or "arms held out from the body, straight",
        suggestion="" if not problems else suggestion,
    )


def clean_background(image: np.ndarray, mask: np.ndarray) -> Check:
    background = image[~mask].reshape(-1, 3).astype(np.float32)
    if len(background) == 0:
        return Check(name="clean_background", passed=True, reason="no background left",
                     suggestion="")
    distance = np.linalg.norm(background - np.median(background, axis=0), axis=1)
    plain = float(np.mean(distance <= BACKGROUND_TOLERANCE))
    passed = plain >= MIN_PLAIN_BACKGROUND
    return Check(
        name="clean_background",
        passed=passed,
        reason=f"{plain:.0%} of the background is one plain colour",
        suggestion="" if passed else
        "generate from the cut-out (background removed) and check its edges",
    )


def run_checks(image: np.ndarray, mask: np.ndarray, label_map: np.ndarray,
               pose: Pose | None) -> list[Check]:
    """All checks for one character: ``mask`` its (H, W) mask, ``label_map`` its ATR parse."""
    mask = mask.astype(bool)
    return [
        full_body_visible(mask, label_map, pose),
        facing_front(label_map, pose),
        t_or_a_pose(mask.shape, pose),
        clean_background(image, mask),
    ]
