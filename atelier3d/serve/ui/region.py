"""The Edit tab's region: a mask the user paints or erases over the source, sent as the edit's
RLE mask. For ``complete_occluded`` on a part, it starts as the part's hidden region (the one the
server would repaint anyway), so it is seen, and can be changed, before the edit runs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from atelier3d import rle
from atelier3d.api.common import RLE

# The brush's colour, and the hidden region drawn in it half-transparent.
REGION_RGB = (255, 59, 48)
REGION_HEX = "#{:02x}{:02x}{:02x}".format(*REGION_RGB)
SHOWN_ALPHA = 160


def region_value(image: np.ndarray | None, region: np.ndarray | None = None,
                 max_bytes: int | None = None) -> dict | None:
    """The ImageEditor's value: ``image`` under a layer with ``region`` painted (or none).

    The page uploads the editor's canvas back with each run, and Gradio refuses a file over the
    upload limit (``max_bytes``), so a canvas whose RGBA pixels would not fit under it is shown
    scaled down; :func:`painted_mask` brings the layers back to the source's size."""
    if image is None:
        return None
    scale = 1.0 if max_bytes is None else min(1.0, (max_bytes / (4.1 * image.shape[0]
                                                                 * image.shape[1])) ** 0.5)
    if scale < 1.0:
        size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        if region is not None:
            region = np.asarray(Image.fromarray(region).resize(size, Image.Resampling.NEAREST))
    layers = []
    if region is not None:
        layer = np.zeros((*region.shape, 4), np.uint8)
        layer[region] = (*REGION_RGB, SHOWN_ALPHA)
        layers.append(layer)
    return {"background": image, "layers": layers, "composite": None}


def painted_mask(value: dict | None, shape: tuple[int, int]) -> np.ndarray | None:
    """What the user's layers cover, as an (H, W) mask of the source (``shape``); None when
    nothing is painted. The editor's canvas may hold the image at another scale: layers are
    brought to the source's size, nearest neighbour, so a stroke stays where it was drawn."""
    if not value:
        return None
    mask = np.zeros(shape, bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue
        painted = layer[..., 3] > 0
        if painted.shape != shape:
            painted = np.asarray(Image.fromarray(painted).resize(
                (shape[1], shape[0]), Image.Resampling.NEAREST))
        mask |= painted
    return mask if mask.any() else None


def mask_rle(mask: np.ndarray | None) -> RLE | None:
    return None if mask is None else RLE(**rle.encode(mask[None])[0])


def result_note(meta: dict | None) -> str:
    """What the server says it ran, for the status line: the region it repainted (its result's
    mask), or the multi-image pipeline when reference images went with the edit."""
    meta = meta or {}
    encoded = meta.get("mask")
    if encoded:
        x, y, w, h = rle.bbox_xywh(encoded)
        return f" · repainted {rle.area(encoded)} px in x {x}–{x + w}, y {y}–{y + h}"
    return " · multi-image pipeline" if meta.get("pipeline") == "plus" else ""
