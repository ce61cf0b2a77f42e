"""What the segment stage's Gateway and its SamDecoder replicas both hold.

SAM's prompt geometry (the transforms of ``segment_anything``'s predictor), the decode request
and its result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from atelier3d import rle
from atelier3d.api.segment import MaskCandidate

IMG_SIZE = 1024

LOW_RES = 256


def preprocess_shape(height: int, width: int, long_side: int = IMG_SIZE) -> tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape``."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def apply_coords(coords: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``ResizeLongestSide.apply_coords``: pixel (x, y) -> the 1024-frame."""
    old_h, old_w = size
    new_h, new_w = preprocess_shape(old_h, old_w)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out


@dataclass(frozen=True)
class DecoderPrompt:
    """The ONNX decoder's prompt inputs for one request."""

    point_coords: np.ndarray  # (1, N, 2) float32, 1024-frame
    point_labels: np.ndarray  # (1, N) float32: 1 fg, 0 bg, 2/3 box corners, -1 padding
    mask_input: np.ndarray  # (1, 1, 256, 256) float32 logits
    has_mask_input: np.ndarray  # (1,) float32
    orig_im_size: np.ndarray  # (2,) int64

    def feeds(self, embedding: np.ndarray) -> dict[str, np.ndarray]:
        """The ONNX decoder's full input dict for ``embedding`` (1, 256, 64, 64)."""
        return {
            "image_embeddings": embedding,
            "point_coords": self.point_coords,
            "point_labels": self.point_labels,
            "mask_input": self.mask_input,
            "has_mask_input": self.has_mask_input,
            "orig_im_size": self.orig_im_size,
        }


def decoder_prompt(
    size: tuple[int, int],
    points: Sequence[Sequence[float]] | np.ndarray | None,
    labels: Sequence[float] | np.ndarray | None,
    box: Sequence[float] | np.ndarray | None,
    mask_logits: np.ndarray | None,
) -> DecoderPrompt:
    """Points, labels, box and low-res mask logits -> ONNX inputs (as in SAM's ONNX notebook).

    Without a box SAM's prompt encoder pads the points with one (0, 0) point labelled -1; with a
    box the two corners are labelled 2 and 3 and there is no padding point.
    """
    coords = [] if points is None else [np.asarray(points, np.float64).reshape(-1, 2)]
    labs = [] if labels is None else [np.asarray(labels, np.float64).reshape(-1)]
    if box is not None:
        coords.append(np.asarray(box, np.float64).reshape(2, 2))
        labs.append(np.array([2.0, 3.0]))
    else:
        coords.append(np.zeros((1, 2)))
        labs.append(np.array([-1.0]))
    all_coords = apply_coords(np.concatenate(coords, axis=0), size)
    if mask_logits is None:
        mask = np.zeros((1, 1, LOW_RES, LOW_RES), np.float32)
        has_mask = np.zeros(1, np.float32)
    else:
        mask = np.asarray(mask_logits, np.float32).reshape(1, 1, LOW_RES, LOW_RES)
        has_mask = np.ones(1, np.float32)
    return DecoderPrompt(
        point_coords=all_coords[None].astype(np.float32),
        point_labels=np.concatenate(labs)[None].astype(np.float32),
        mask_input=mask,
        has_mask_input=has_mask,
        orig_im_size=np.array(size, dtype=np.int64),
    )


def mask_to_logits(mask: np.ndarray, magnitude: float = 10.0) -> np.ndarray:
    """A full-resolution binary mask -> SAM's (256, 256) low-res logit frame.

    The mask is resized into the 1024-frame like the image, padded, averaged down to 256 and
    mapped to +/- ``magnitude`` (confident logits, like those SAM itself produces for a clean
    mask). Used when a client sends a mask it made elsewhere; a mask SAM made is refined from
    its own logits instead.
    """
    h, w = mask.shape
    new_h, new_w = preprocess_shape(h, w)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, new_h), Image.BILINEAR)
    frame = np.zeros((IMG_SIZE, IMG_SIZE), np.float32)
    frame[:new_h, :new_w] = np.asarray(resized, np.float32) / 255.0
    factor = IMG_SIZE // LOW_RES
    low = frame.reshape(LOW_RES, factor, LOW_RES, factor).mean(axis=(1, 3))
    return ((low * 2.0 - 1.0) * magnitude).astype(np.float32)


@dataclass
class DecodeRequest:
    embedding: list  # [ObjectRef] - wrapped so Serve passes the reference, not the 4 MiB array
    size: tuple[int, int]
    # The prompt as the client sent it (lists, or arrays): decoder_prompt converts it once.
    points: Sequence[Sequence[float]] | np.ndarray | None
    labels: Sequence[float] | np.ndarray | None
    box: Sequence[float] | np.ndarray | None
    mask_logits: np.ndarray | None
    multimask: bool
    return_low_res: bool


def routed(decoder, request: DecodeRequest):
    """The SamDecoder handle to send ``request`` with: keyed by its embedding's reference
    (Serve's ``multiplexed_model_id``), so Serve's router sends it to the replica that already
    holds that embedding, and with several replicas each embedding is fetched by one."""
    return decoder.options(multiplexed_model_id=request.embedding[0].hex())


def mask_candidates(masks: np.ndarray, scores: np.ndarray) -> list[MaskCandidate]:
    """The decoder's ``(K, H, W)`` masks and predicted IoUs as the candidates it returns: the
    type the session stores and the API answers with."""
    return [
        MaskCandidate(rle=encoded, score=float(score), bbox=bbox, area=area)
        for (encoded, bbox, area), score in zip(rle.encode_measured(masks), scores, strict=True)
    ]


@dataclass
class DecodeResult:
    candidates: list[MaskCandidate]
    low_res: np.ndarray | None  # (K, 256, 256) float32 logits
    decode_ms: float

    @property
    def best(self) -> int:
        """The index of the candidate with the highest score (SAM's own choice)."""
        return int(np.argmax([c.score for c in self.candidates]))
