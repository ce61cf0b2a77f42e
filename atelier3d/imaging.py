"""Turning untrusted upload bytes into an RGB array, and arrays back into PNG bytes."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from atelier3d.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}


def _to_rgb(img: Image.Image, keep_alpha: bool = False) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of PIL's clipping.
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr * (255.0 / peak)).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if keep_alpha:
            return rgba
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int, keep_alpha: bool = False) -> np.ndarray:
    """Decodes an upload to an ``(H, W, 3)`` uint8 RGB array, or raises a 4xx ``ApiError``.

    With ``keep_alpha``, an image with transparency comes back as ``(H, W, 4)`` RGBA instead of
    composited on white (cut-outs sent for 3D keep their alpha).

    The type is sniffed from the bytes, never from a file name. The pixel count is checked from the
    header before any pixel is decoded, so a decompression bomb costs nothing.
    """
    if not data:
        raise BadRequest("the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType("the upload is not an image this server can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from exc
    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"image format {img.format} is not accepted")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadRequest("the image has zero width or height")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height}, more than {max_pixels} pixels")
    if getattr(img, "n_frames", 1) > 1:
        raise BadRequest("animated or multi-frame images are not supported; upload one frame")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img, keep_alpha)
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"the image is corrupt or truncated: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decodes a PNG this server made itself (no limits to check), keeping its alpha."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGBA" if "A" in img.mode else "RGB"), dtype=np.uint8)
