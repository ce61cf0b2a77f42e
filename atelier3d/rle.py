"""COCO run-length encoding of masks, the wire format of every mask in the API."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from atelier3d.errors import BadRequest


def encode(masks: np.ndarray) -> list[dict]:
    """``(K, H, W)`` booleans -> K COCO RLEs ``{"size": [H, W], "counts": str}``."""
    # pycocotools wants Fortran-ordered (H, W, K) uint8 and returns counts as bytes.
    fortran = np.asfortranarray(np.transpose(masks, (1, 2, 0)).astype(np.uint8))
    encoded = mask_utils.encode(fortran)
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in encoded]


def _coco(rle: dict) -> dict:
    return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def bbox_xywh(rle: dict) -> list[int]:
    return [int(v) for v in mask_utils.toBbox(_coco(rle))]


def area(rle: dict) -> int:
    return int(mask_utils.area(_coco(rle)))


def _runs_from_string(counts: str) -> list[int]:
    """Parses COCO's compressed counts (pycocotools' rleFrString), rejecting malformed input.

    pycocotools itself does not validate: garbage decodes to garbage or reads out of bounds.
    """
    if not counts.isascii():
        raise BadRequest("malformed RLE counts: not ASCII")
    runs: list[int] = []
    p = 0
    while p < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise BadRequest("malformed RLE counts: truncated run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise BadRequest("malformed RLE counts: character out of range")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            p += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise BadRequest("malformed RLE counts: negative run")
        runs.append(value)
    return runs


def decode(rle: dict, size: tuple[int, int]) -> np.ndarray:
    """A client's RLE -> ``(H, W)`` bool, checked against the image ``size``; 4xx if malformed.

    ``counts`` may be the compressed string or the uncompressed list of run lengths.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise BadRequest("an RLE is an object with 'size' [height, width] and 'counts'")
    rle_size = rle["size"]
    if not (isinstance(rle_size, list | tuple) and len(rle_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in rle_size)):
        raise BadRequest("RLE 'size' must be [height, width] integers")
    if tuple(rle_size) != tuple(size):
        raise BadRequest(f"RLE size {list(rle_size)} does not match the image {list(size)}")
    h, w = size
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise BadRequest("uncompressed RLE counts must be non-negative integers")
        if sum(counts) != h * w:
            raise BadRequest(f"RLE counts cover {sum(counts)} pixels, the image has {h * w}")
        coco = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, str):
        runs = _runs_from_string(counts)
        if sum(runs) != h * w:
            raise BadRequest(f"RLE counts cover {sum(runs)} pixels, the image has {h * w}")
        coco = {"size": [h, w], "counts": counts.encode("ascii")}
    else:
        raise BadRequest("RLE 'counts' must be a string or a list of integers")
    return mask_utils.decode(coco).astype(bool)
