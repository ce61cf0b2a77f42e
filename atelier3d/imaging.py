"""Turning untrusted upload bytes into an RGB array, and arrays back into PNG bytes."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from atelier3d.errors import ApiError, BadRequest, PayloadTooLarge, UnsupportedMediaType

# MPO: a JPEG with extra pictures after the main one (phone cameras write them); the first frame
# is the photo, the others are previews or depth maps, so it is read as the JPEG it is.
ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"}


def _to_rgb(img: Image.Image, keep_alpha: bool = False) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit integer or float greyscale: scaled to 8 bits instead of PIL's clipping.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low = min(float(arr.min()), 0.0) if arr.size else 0.0
        peak = float(arr.max()) - low if arr.size else 0.0
        scale = 255.0 / peak if peak > 0 else 0.0
        img = Image.fromarray(((arr - low) * scale).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        if keep_alpha:
            return rgba
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is when that tag is unreadable."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the picture
        return img


def decode_image(data: bytes, max_pixels: int, keep_alpha: bool = False,
                 max_aspect_ratio: float | None = None) -> np.ndarray:
    """Decodes an upload to an ``(H, W, 3)`` uint8 RGB array, or raises a 4xx ``ApiError``.

    With ``keep_alpha``, an image with transparency comes back as ``(H, W, 4)`` RGBA instead of
    composited on white (cut-outs sent for 3D keep their alpha).

    The type is sniffed from the bytes, never from a file name or a Content-Type. The pixel count
    is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing: 413, whether our limit or PIL's own bomb check (``Image.MAX_IMAGE_PIXELS``) sees it
    first. Animated and multi-frame images (GIF, APNG, WebP, multi-page TIFF) are refused with
    400 rather than silently reduced to their first frame (an MPO camera JPEG is its first
    frame). Every colour mode PIL reads (CMYK,
    16-bit, grey, grey + alpha, palette with transparency, RGBA) becomes RGB; the EXIF
    orientation is applied, so the size is the one the image is displayed at. Whatever else goes
    wrong while decoding these untrusted bytes is the upload's fault: 400, never a 500.
    """
    if not data:
        raise BadRequest("the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ACCEPTED_FORMATS:
                raise UnsupportedMediaType(f"image format {img.format} is not accepted "
                                           f"(use {', '.join(sorted(ACCEPTED_FORMATS))})")
            width, height = img.size
            if width <= 0 or height <= 0:
                raise BadRequest("the image has zero width or height")
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height}, more than {max_pixels} pixels")
            if max_aspect_ratio is not None and \
                    max(width, height) > max_aspect_ratio * min(width, height):
                raise BadRequest(f"image is {width}x{height}: the longer side may be at most "
                                 f"{max_aspect_ratio:g} times the shorter")
            # is_animated stops at the second frame; n_frames would walk every one.
            if img.format != "MPO" and getattr(img, "is_animated", False):
                raise BadRequest("animated or multi-frame images are not supported; upload one "
                                 "frame (e.g. as PNG)")
            img.load()
            img = _upright(img)
            rgb = _to_rgb(img, keep_alpha)
            return np.asarray(rgb, dtype=np.uint8)
    except ApiError:
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType("the upload is not an image this server can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from exc
    except MemoryError as exc:
        raise PayloadTooLarge("the image is too large to decode") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a 400
        detail = str(exc)[:200] or type(exc).__name__
        raise BadRequest(f"the image is corrupt or truncated: {detail}") from exc


DOWNSCALE_MAX_PIXELS = 50_000_000  # the largest image the UI offers to scale down (150 MB RGB)


def downscaled(data: bytes, max_pixels: int,
               max_source_pixels: int = DOWNSCALE_MAX_PIXELS) -> np.ndarray:
    """An upload over the pixel limit, scaled down to fit ``max_pixels`` (the UI offers it
    instead of only refusing). It is decoded with ``max_source_pixels`` as its limit, with
    every check of :func:`decode_image`."""
    rgb = decode_image(data, max_source_pixels)
    height, width = rgb.shape[:2]
    scale = math.sqrt(max_pixels / (height * width))
    if scale >= 1:
        return rgb
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decodes a PNG this server made itself (no limits to check), keeping its alpha."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGBA" if "A" in img.mode else "RGB"), dtype=np.uint8)


def mask_bbox(region: np.ndarray) -> tuple[int, int, int, int] | None:
    """x0, y0, x1, y1 (exclusive) of the True pixels, or None if there are none."""
    rows, cols = np.any(region, axis=1), np.any(region, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


def crop_with_margin(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """A non-empty mask's box grown by ``margin`` of its longer side on each side, within the
    image: x0, y0, x1, y1 (exclusive)."""
    x0, y0, x1, y1 = mask_bbox(mask)
    pad = round(margin * max(x1 - x0, y1 - y0))
    h, w = mask.shape
    return max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
