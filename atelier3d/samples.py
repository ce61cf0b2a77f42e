"""Example images that work offline: photos scikit-image ships, and a character drawn here."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PHOTOS = {"astronaut": "astronaut", "coffee": "coffee", "chelsea (cat)": "chelsea"}


def photo(name: str) -> np.ndarray:
    """An RGB photo from ``skimage.data`` (shipped inside the wheel, no download)."""
    from skimage import data

    return np.asarray(getattr(data, PHOTOS.get(name, name))(), dtype=np.uint8)


def drawn_character(width: int = 384, height: int = 640) -> np.ndarray:
    """A flat-shaded, anime-style standing figure on a plain background.

    Flat colours and hard edges are what real SAM finds hardest in 2D art, and distinct regions
    (hair, face, shirt, skirt, legs, shoes) give later stages known label areas.
    """
    img = Image.new("RGB", (width, height), (236, 240, 245))
    d = ImageDraw.Draw(img)
    cx = width // 2
    u = height / 640  # unit: drawn for 640 px tall, scaled
    def box(x0, y0, x1, y1):
        return [cx + x0 * u, y0 * u, cx + x1 * u, y1 * u]
    d.ellipse(box(-62, 40, 62, 170), fill=(60, 40, 90))  # hair (back)
    d.ellipse(box(-48, 62, 48, 170), fill=(250, 222, 200))  # face
    d.pieslice(box(-62, 40, 62, 150), 180, 360, fill=(60, 40, 90))  # fringe
    d.ellipse(box(-26, 110, -12, 126), fill=(40, 90, 170))  # eyes
    d.ellipse(box(12, 110, 26, 126), fill=(40, 90, 170))
    d.rectangle(box(-14, 168, 14, 190), fill=(250, 222, 200))  # neck
    d.polygon([(cx - 70 * u, 190 * u), (cx + 70 * u, 190 * u), (cx + 60 * u, 340 * u),
               (cx - 60 * u, 340 * u)], fill=(200, 60, 70))  # shirt
    d.rectangle(box(-100, 196, -72, 330), fill=(250, 222, 200))  # arms
    d.rectangle(box(72, 196, 100, 330), fill=(250, 222, 200))
    d.polygon([(cx - 60 * u, 340 * u), (cx + 60 * u, 340 * u), (cx + 95 * u, 450 * u),
               (cx - 95 * u, 450 * u)], fill=(40, 50, 110))  # skirt
    d.rectangle(box(-40, 450, -14, 585), fill=(250, 222, 200))  # legs
    d.rectangle(box(14, 450, 40, 585), fill=(250, 222, 200))
    d.rectangle(box(-50, 585, -8, 610), fill=(90, 50, 30))  # shoes
    d.rectangle(box(8, 585, 50, 610), fill=(90, 50, 30))
    return np.asarray(img)


def examples() -> dict[str, np.ndarray]:
    out = {name: photo(name) for name in PHOTOS}
    out["drawn character"] = drawn_character()
    return out
