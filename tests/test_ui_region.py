"""The Edit tab's region: what the editor shows and what a painted layer sends."""

from __future__ import annotations

import numpy as np

from atelier3d import rle
from atelier3d.serve.ui.region import (
    SHOWN_ALPHA,
    mask_rle,
    painted_mask,
    region_value,
    result_note,
)


def test_the_hidden_region_is_shown_and_sent_back_unchanged():
    image = np.zeros((40, 30, 3), np.uint8)
    hidden = np.zeros((40, 30), bool)
    hidden[5:12, 3:9] = True
    value = region_value(image, hidden)
    assert value["background"] is image and (value["layers"][0][hidden, 3] == SHOWN_ALPHA).all()
    np.testing.assert_array_equal(painted_mask(value, (40, 30)), hidden)
    assert region_value(image)["layers"] == [] and region_value(None) is None


def test_a_canvas_over_the_upload_limit_is_shown_smaller_and_sent_back_full_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 300, 3), np.uint8)  # noise: PNG barely compresses it
    hidden = np.zeros((400, 300), bool)
    hidden[100:300, 60:240] = True
    limit = 200_000
    value = region_value(image, hidden, max_bytes=limit)
    height, width = value["background"].shape[:2]
    assert height * width * 4 < limit and abs(height / width - 4 / 3) < 0.02
    assert value["layers"][0].shape[:2] == (height, width)
    sent = painted_mask(value, (400, 300))
    assert sent.shape == (400, 300) and (sent != hidden).mean() < 0.01
    assert region_value(image, hidden, max_bytes=10**9)["background"] is image


def test_a_layer_drawn_at_another_scale_lands_where_it_was_drawn():
    layer = np.zeros((80, 60, 4), np.uint8)  # the canvas at twice the source's size
    layer[20:40, 30:60, 3] = 255
    mask = painted_mask({"background": None, "layers": [layer]}, (40, 30))
    expected = np.zeros((40, 30), bool)
    expected[10:20, 15:30] = True
    np.testing.assert_array_equal(mask, expected)
    erased = {"layers": [np.zeros((40, 30, 4), np.uint8)]}
    assert painted_mask(erased, (40, 30)) is None and mask_rle(None) is None
    assert painted_mask(None, (40, 30)) is None


def test_the_status_says_what_the_server_repainted():
    mask = np.zeros((40, 30), bool)
    mask[10:20, 15:30] = True
    encoded = mask_rle(mask)
    assert rle.decode(encoded.model_dump(), (40, 30)).sum() == 150
    note = result_note({"mask": encoded.model_dump()})
    assert note == " · repainted 150 px in x 15–30, y 10–20"
    assert result_note({"mask": None, "pipeline": "edit"}) == result_note(None) == ""
    assert result_note({"mask": None, "pipeline": "plus"}) == " · multi-image pipeline"
