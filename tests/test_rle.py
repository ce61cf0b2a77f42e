"""The decoder's candidates: RLE, box and area from one encoding, as pycocotools measures them."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from atelier3d import rle
from atelier3d.errors import BadRequest


@pytest.mark.parametrize("seed", range(12))
def test_box_and_area_from_the_array_equal_pycocotools(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 200, 2))
    masks = np.zeros((4, height, width), bool)
    masks[0] = rng.random((height, width)) > 0.7  # speckle, as random weights give
    y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
    x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
    masks[1, y0:y1 + 1, x0:x1 + 1] = True  # a rectangle
    masks[3] = True  # masks[2] stays empty
    measured = rle.encode_measured(masks)
    assert len(measured) == 4
    for mask, (encoded, bbox, area) in zip(masks, measured, strict=True):
        coco = {"size": encoded["size"], "counts": encoded["counts"].encode("ascii")}
        assert bbox == [int(v) for v in mask_utils.toBbox(coco)]
        assert area == int(mask_utils.area(coco)) == int(mask.sum())
        np.testing.assert_array_equal(rle.decode(encoded, (height, width)), mask)
        np.testing.assert_array_equal(rle.decode_own(encoded), mask)
    assert measured[1][1] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    assert measured[2][1:] == ([0, 0, 0, 0], 0)


def test_an_uncompressed_rle_is_checked_even_where_the_server_made_it():
    good = {"size": [2, 3], "counts": [1, 4, 1]}
    np.testing.assert_array_equal(rle.decode_own(good), [[False, True, True], [True, True, False]])
    with pytest.raises(BadRequest, match="cover 5 pixels"):
        rle.decode_own({"size": [2, 3], "counts": [1, 4]})
