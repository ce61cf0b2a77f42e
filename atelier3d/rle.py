"""COCO run-length encoding of masks, the wire format of every mask in the API."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from atelier3d.errors import BadRequest


def _encode_coco(masks: np.ndarray) -> list[dict]:
    # pycocotools wants Fortran-ordered (H, W, K) uint8 and returns counts as bytes.
    fortran = np.asfortranarray(np.transpose(masks, (1, 2, 0)).astype(np.uint8))
    return mask_utils.encode(fortran)


def _as_json(coco: dict) -> dict:
    return {"size": [int(s) for s in coco["size"]], "counts": coco["counts"].decode("ascii")}


def encode(masks: np.ndarray) -> list[dict]:
    """``(K, H, W)`` booleans -> K COCO RLEs ``{"size": [H, W], "counts": str}``."""
    return [_as_json(r) for r in _encode_coco(masks)]


def encode_measured(masks: np.ndarray) -> list[tuple[dict, list[int], int]]:
    """``(K, H, W)`` booleans -> per mask its RLE, ``[x, y, w, h]`` box and area. The box and
    area come from the array (pycocotools would decode the runs again for each)."""
    masks = np.asarray(masks, bool)
    areas = masks.sum(axis=(1, 2))
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    measured = []
    for encoded, area, row, col in zip(encode(masks), areas, rows, cols, strict=True):
        if not area:
            measured.append((encoded, [0, 0, 0, 0], 0))
            continue
        y0, y1 = np.flatnonzero(row)[[0, -1]]
        x0, x1 = np.flatnonzero(col)[[0, -1]]
        measured.append((encoded, [int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)],
                         int(area)))
    return measured


def _coco(rle: dict) -> dict:
    return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def bbox_xywh(rle: dict) -> list[int]:
    return [int(v) for v in mask_utils.toBbox(_coco(rle))]


def area(rle: dict) -> int:
    return int(mask_utils.area(_coco(rle)))


# Characters per run in a compressed string: 7 hold 35 bits, more than any image's pixel count.
# Longer runs are refused before any arithmetic, so a megabyte of continuation characters cannot
# turn into a megabit integer.
MAX_RUN_CHARS = 7


def _runs_from_string(counts: str) -> np.ndarray:
    """Parses COCO's compressed counts (pycocotools' rleFrString), rejecting malformed input.

    pycocotools itself does not validate: garbage decodes to garbage or reads out of bounds.
    Vectorised, so a long string costs milliseconds, not a Python loop per character.
    """
    if not counts.isascii():
        raise BadRequest("malformed RLE counts: not ASCII")
    codes = np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, np.int64)
    if ((codes < 0) | (codes > 63)).any():
        raise BadRequest("malformed RLE counts: character out of range")
    last = (codes & 0x20) == 0  # a character without the continuation bit ends a run
    if not last[-1]:
        raise BadRequest("malformed RLE counts: truncated run")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > MAX_RUN_CHARS:
        raise BadRequest(f"malformed RLE counts: a run of more than {MAX_RUN_CHARS} characters")
    position = np.arange(codes.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((codes & 0x1F) << (5 * position), starts)
    negative = (codes[ends] & 0x10) != 0  # sign bit of the last character
    values -= negative.astype(np.int64) << (5 * lengths)
    # From the fourth run on, each is a difference to the run two before it.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        raise BadRequest("malformed RLE counts: negative run")
    return runs


def decode_own(rle: dict) -> np.ndarray:
    """An RLE this server encoded (a decoder's candidate, a session's stored mask) -> ``(H, W)``
    bool, without ``decode``'s checks of a client's input: on a speckled mask they cost three
    times the decode itself."""
    if not isinstance(rle["counts"], str):  # never from ``encode``; checked like a client's
        return decode(rle, tuple(rle["size"]))
    return mask_utils.decode(_coco(rle)).astype(bool)


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
        covered = int(_runs_from_string(counts).sum())
        if covered != h * w:
            raise BadRequest(f"RLE counts cover {covered} pixels, the image has {h * w}")
        coco = {"size": [h, w], "counts": counts.encode("ascii")}
    else:
        raise BadRequest("RLE 'counts' must be a string or a list of integers")
    return mask_utils.decode(coco).astype(bool)
