"""The images a character job hands on: a garment with its hidden region filled from its
completion edit, the character with its completed garments, a part in the full frame."""

from __future__ import annotations

import numpy as np
from PIL import Image

from atelier3d.stages.mesh import MIN_BOX_PX, alpha_box
from atelier3d.stages.parse import Part


def completed_garment(part: Part, completed: np.ndarray, edited_rgb: np.ndarray) -> np.ndarray:
    """The part's crop (RGBA) with what hid it filled in: the part's own pixels where it was
    seen, the completion edit's (resized to the crop; an inpainting edit comes back at ~1 MP)
    in the hidden region, the parse's completed outline as alpha."""
    h, w = part.rgba.shape[:2]
    edited = np.asarray(Image.fromarray(edited_rgb[..., :3]).resize((w, h),
                                                                     Image.Resampling.LANCZOS))
    hidden = (completed[..., 3] > 0) & ~part.region
    out = part.rgba.copy()
    out[hidden, :3] = edited[hidden]
    out[hidden, 3] = completed[hidden, 3]
    return out


def full_frame(size: tuple[int, int], box: tuple[int, int, int, int],
               rgba: np.ndarray) -> np.ndarray:
    """``rgba``, a crop at ``box``, placed in a transparent image of ``size`` (H, W), so the
    layers of one asset line up."""
    frame = np.zeros((*size, 4), np.uint8)
    x0, y0, x1, y1 = box
    frame[y0:y1, x0:x1] = rgba[: y1 - y0, : x1 - x0]
    return frame


def paste(base: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """``layer`` (full frame, RGBA) over ``base`` (full frame, RGBA) where it is opaque."""
    out = base.copy()
    seen = layer[..., 3] > 0
    out[seen] = layer[seen]
    return out


def too_small(rgba: np.ndarray) -> str | None:
    """Why a layer cannot become a mesh (the image encoder needs enough pixels), or None."""
    box = alpha_box(rgba)
    if box is None:
        return "empty"
    x0, y0, x1, y1 = box
    if max(x1 - x0, y1 - y0) < MIN_BOX_PX or min(x1 - x0, y1 - y0) < 2:
        return f"{x1 - x0}x{y1 - y0} px, under the {MIN_BOX_PX} px 3D needs"
    return None
