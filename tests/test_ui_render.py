"""The Segment tab's drawing: a tint worked within the mask's box equals the same blend over the
whole image (outline included), for masks anywhere, touching the borders, or empty."""

from __future__ import annotations

import numpy as np

from atelier3d.serve.ui.segment import _edges, _tint


def tint_whole_image(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
                     alpha: float) -> np.ndarray:
    out = image.copy()
    out[mask] = (out[mask] * (1 - alpha) + np.array(colour, np.float32) * alpha).astype(np.uint8)
    out[_edges(mask)] = colour
    return out


def test_tint_within_the_box_equals_the_whole_image_blend() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    masks = [np.zeros((48, 64), bool), np.ones((48, 64), bool)]
    for _ in range(100):
        mask = np.zeros((48, 64), bool)
        y, x = rng.integers(0, 48), rng.integers(0, 64)
        mask[y:y + rng.integers(1, 24), x:x + rng.integers(1, 32)] = True
        masks.append(mask & (rng.random(mask.shape) < 0.8))  # holes: inner outlines too
    for mask in masks:
        got = _tint(image, mask, (30, 144, 255), 0.5)
        assert np.array_equal(got, tint_whole_image(image, mask, (30, 144, 255), 0.5))
    assert np.array_equal(_tint(image, masks[0], (1, 2, 3), 0.5), image)
