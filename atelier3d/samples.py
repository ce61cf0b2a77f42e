"""Example images that work offline: photos scikit-image ships, and a character drawn here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from atelier3d.stages import parse as atr

PHOTOS = {"astronaut": "astronaut", "coffee": "coffee", "chelsea (cat)": "chelsea"}


def photo(name: str) -> np.ndarray:
    """An RGB photo from ``skimage.data`` (shipped inside the wheel, no download)."""
    from skimage import data

    return np.asarray(getattr(data, PHOTOS.get(name, name))(), dtype=np.uint8)


BACKGROUND_RGB = (236, 240, 245)
SKIN_RGB = (250, 222, 200)


def _figure(width: int, height: int) -> list[tuple[str, tuple, tuple[int, int, int], int]]:
    """The figure's shapes, back to front: (ImageDraw method, its arguments, RGB, ATR label).

    Left/right labels are the character's own sides: it faces the viewer, so its right arm is on
    the image's left.
    """
    cx = width // 2
    u = height / 640  # unit: drawn for 640 px tall, scaled

    def box(x0, y0, x1, y1):
        return [cx + x0 * u, y0 * u, cx + x1 * u, y1 * u]

    def trapezoid(top, bottom, y0, y1):
        return [(cx - top * u, y0 * u), (cx + top * u, y0 * u), (cx + bottom * u, y1 * u),
                (cx - bottom * u, y1 * u)]

    hair, eyes, shirt, skirt, shoes = (60, 40, 90), (40, 90, 170), (200, 60, 70), (40, 50, 110), (
        90, 50, 30)
    return [
        ("ellipse", (box(-62, 40, 62, 170),), hair, atr.HAIR),  # hair (back)
        ("ellipse", (box(-48, 62, 48, 170),), SKIN_RGB, atr.FACE),
        ("pieslice", (box(-62, 40, 62, 150), 180, 360), hair, atr.HAIR),  # fringe
        ("ellipse", (box(-26, 110, -12, 126),), eyes, atr.FACE),
        ("ellipse", (box(12, 110, 26, 126),), eyes, atr.FACE),
        ("rectangle", (box(-14, 168, 14, 190),), SKIN_RGB, atr.FACE),  # neck: ATR has no label
        ("polygon", (trapezoid(70, 60, 190, 340),), shirt, atr.UPPER_CLOTHES),
        ("rectangle", (box(-100, 196, -72, 330),), SKIN_RGB, atr.RIGHT_ARM),
        ("rectangle", (box(72, 196, 100, 330),), SKIN_RGB, atr.LEFT_ARM),
        ("polygon", (trapezoid(60, 95, 340, 450),), skirt, atr.SKIRT),
        ("rectangle", (box(-40, 450, -14, 585),), SKIN_RGB, atr.RIGHT_LEG),
        ("rectangle", (box(14, 450, 40, 585),), SKIN_RGB, atr.LEFT_LEG),
        ("rectangle", (box(-50, 585, -8, 610),), shoes, atr.RIGHT_SHOE),
        ("rectangle", (box(8, 585, 50, 610),), shoes, atr.LEFT_SHOE),
    ]


def drawn_character(width: int = 384, height: int = 640) -> np.ndarray:
    """A flat-shaded, anime-style standing figure on a plain background.

    Flat colours and hard edges are what real SAM finds hardest in 2D art, and distinct regions
    (hair, face, shirt, skirt, legs, shoes) give later stages known label areas.
    """
    img = Image.new("RGB", (width, height), BACKGROUND_RGB)
    d = ImageDraw.Draw(img)
    for method, args, rgb, _ in _figure(width, height):
        getattr(d, method)(*args, fill=rgb)
    return np.asarray(img)


def drawn_character_labels(width: int = 384, height: int = 640) -> np.ndarray:
    """The ground-truth ATR label map of :func:`drawn_character`, ``(H, W)`` uint8.

    Drawn from the very same shapes, so every pixel's label matches its colour region.
    """
    img = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(img)
    for method, args, _, label in _figure(width, height):
        getattr(d, method)(*args, fill=label)
    return np.asarray(img)


@dataclass(frozen=True)
class Example:
    """A sample image as the UI offers it: its file name, and a caption in words (what a person
    reads under it, and a screen reader reads for it)."""

    name: str
    caption: str
    image: np.ndarray


def examples() -> list[Example]:
    return [
        Example("drawn", "Anime character, full body", drawn_character()),
        Example("astronaut", "Astronaut in an orange suit, half length", photo("astronaut")),
        Example("chelsea", "Tabby cat, face close-up", photo("chelsea")),
        Example("coffee", "Espresso cup on a saucer, from above", photo("coffee")),
    ]
