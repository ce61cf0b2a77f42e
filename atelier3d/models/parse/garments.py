"""Garment cut-outs from a parse map, and the classical completion of their occluded parts.

A part is an RGBA image cropped to its region's box: alpha is 255 inside the region, 0 outside,
and ramps down over ``feather_px`` pixels *inside* the boundary, so nothing of a neighbouring region
ever bleeds in and the part's support is exactly its region. Occlusion completion fills what other
regions (hair, arms) hide of the garment's hull with the garment's own colours (OpenCV inpainting
that only ever samples garment pixels) and changes nothing outside that hidden area except the
feather seam along it, which becomes as opaque as the completed region's interior.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from atelier3d.imaging import mask_bbox
from atelier3d.stages.parse import GARMENT_LABELS, GROUPS, LABELS, OCCLUDER_LABELS, Part

HullMethod = Literal["convex", "close"]


def feathered_alpha(region: np.ndarray, feather_px: int) -> np.ndarray:
    """``(H, W)`` bool -> uint8 alpha: 255 deeper than ``feather_px`` inside, ramping to the edge.

    Outside the array counts as outside the region, so a crop's border is feathered like any edge.
    """
    import cv2

    if feather_px <= 0:
        return region.astype(np.uint8) * 255
    padded = np.pad(region, 1).astype(np.uint8)
    depth = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    ramp = np.clip(depth / (feather_px + 1), 0.0, 1.0)  # edge pixels have depth 1, never 0
    return np.where(region, np.maximum(np.round(ramp * 255), 1), 0).astype(np.uint8)


def cut_out(image: np.ndarray, region: np.ndarray, name: str, labels: tuple[int, ...],
            feather_px: int = 2) -> Part | None:
    """One RGBA part from a full-image region (None if the region is empty)."""
    box = mask_bbox(region)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    crop = region[y0:y1, x0:x1]
    rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
    rgba[..., :3] = np.where(crop[..., None], image[y0:y1, x0:x1], 0)
    rgba[..., 3] = feathered_alpha(crop, feather_px)
    return Part(name=name, labels=labels, box=box, rgba=rgba)


def extract_parts(
    image: np.ndarray,
    label_map: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    labels: Iterable[int] = GARMENT_LABELS,
    groups: Sequence[str] = (),
    feather_px: int = 2,
) -> list[Part]:
    """One part per present label of ``labels``, then one per named group (see ``GROUPS``).

    ``mask`` (the character's mask) limits every region, so a parse error outside the character
    never becomes part of a garment.
    """
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown part groups {unknown}; known: {sorted(GROUPS)}")
    inside = np.ones(label_map.shape, bool) if mask is None else mask.astype(bool)
    wanted = [(LABELS[i], (i,)) for i in labels] + [(g, GROUPS[g]) for g in groups]
    parts = []
    for name, ids in wanted:
        part = cut_out(image, np.isin(label_map, ids) & inside, name, ids, feather_px)
        if part is not None:
            parts.append(part)
    return parts


def hull(region: np.ndarray, method: HullMethod = "convex", close_px: int = 15) -> np.ndarray:
    """Where the garment would be without occluders: its convex hull, or a morphological closing
    (for concave garments, where the convex hull would bridge e.g. the gap between two legs)."""
    import cv2

    mask = region.astype(np.uint8)
    if method == "convex":
        points = cv2.findNonZero(mask)
        out = np.zeros_like(mask)
        if points is not None:
            cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
        return out.astype(bool) | region
    # Padding keeps the closing from being clipped (or invented) at the crop's border.
    pad = close_px + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * close_px + 1, 2 * close_px + 1))
    closed = cv2.morphologyEx(np.pad(mask, pad), cv2.MORPH_CLOSE, kernel)
    return closed[pad:-pad, pad:-pad].astype(bool) | region


def hidden_region(region: np.ndarray, occluder_mask: np.ndarray,
                  method: HullMethod = "convex", close_px: int = 15) -> np.ndarray:
    """The part of the garment's hull that occluders cover: what completion fills."""
    return hull(region, method, close_px) & occluder_mask.astype(bool) & ~region


def complete_occlusion(
    rgba_part: np.ndarray,
    occluder_mask: np.ndarray,
    *,
    method: HullMethod = "convex",
    close_px: int = 15,
    inpaint_radius: int = 5,
    feather_px: int = 2,
) -> np.ndarray:
    """Fills the hidden part of a garment's hull with the garment's own colours.

    ``occluder_mask`` is aligned with ``rgba_part`` (use ``Part.crop`` on a full-image mask).
    RGB changes only in the hidden region; alpha changes only there and in the feather seam
    along it (``feather_px`` should be the one the part was cut with).
    """
    import cv2

    if occluder_mask.shape != rgba_part.shape[:2]:
        raise ValueError(f"occluder mask {occluder_mask.shape} vs part {rgba_part.shape[:2]}")
    region = rgba_part[..., 3] > 0
    hidden = hidden_region(region, occluder_mask, method, close_px)
    out = rgba_part.copy()
    if not hidden.any() or not region.any():
        return out
    # Everything but the garment is "unknown" to the inpainter, so it can only propagate garment
    # colours, never the occluder's or the background's; only the hidden pixels are kept. It
    # works on the hidden area's box plus a margin of garment: the cost follows the hole's size.
    margin = 4 * inpaint_radius + 8
    x0, y0, x1, y1 = mask_bbox(hidden)
    h, w = region.shape
    window = np.s_[max(0, y0 - margin):min(h, y1 + margin), max(0, x0 - margin):min(w, x1 + margin)]
    unknown = (~region[window]).astype(np.uint8)
    filled = cv2.inpaint(np.ascontiguousarray(rgba_part[window][..., :3]), unknown,
                         inpaint_radius, cv2.INPAINT_TELEA)
    out[window][hidden[window], :3] = filled[hidden[window]]
    completed_alpha = feathered_alpha(region | hidden, feather_px)
    out[..., 3] = np.maximum(rgba_part[..., 3], completed_alpha)
    return out


def complete_parts(
    parts: Sequence[Part],
    label_map: np.ndarray,
    occluder_labels: Iterable[int] = OCCLUDER_LABELS,
    **options,
) -> dict[str, np.ndarray]:
    """Occlusion-completed RGBA per part, for the parts something actually hides.

    ``options`` are those of :func:`complete_occlusion`.
    """
    occluder_ids = tuple(occluder_labels)
    completed = {}
    for part in parts:
        occluders = np.isin(part.crop(label_map), [i for i in occluder_ids if i not in part.labels])
        rgba = complete_occlusion(part.rgba, occluders, **options)
        if not np.array_equal(rgba, part.rgba):
            completed[part.name] = rgba
    return completed
