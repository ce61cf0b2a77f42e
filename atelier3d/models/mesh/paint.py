"""Hunyuan3D-Paint (hy3dgen's ``Hunyuan3DPaintPipeline``) on any torch device.

hy3dgen's texture renderer imports ``custom_rasterizer``, a CUDA extension built from source that
no package registry ships. :func:`install_rasterizer` registers the torch rasterizer of
``atelier3d.models.mesh.rasterizer`` under that name where the compiled one is missing, so the
renderer runs from this project's install on the CPU and on any CUDA GPU.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Literal

from atelier3d.models.mesh import rasterizer

logger = logging.getLogger(__name__)

RASTERIZER_MODULE = "custom_rasterizer"
Rasterizer = Literal["compiled", "torch"]


def install_rasterizer() -> Rasterizer:
    """Makes ``import custom_rasterizer`` work: hy3dgen's compiled extension where it is
    installed ("compiled"), else this project's torch one ("torch")."""
    current = sys.modules.get(RASTERIZER_MODULE)
    if current is rasterizer:
        return "torch"
    if current is not None:
        return "compiled"
    try:
        importlib.import_module(RASTERIZER_MODULE)
        return "compiled"
    except ImportError:
        sys.modules[RASTERIZER_MODULE] = rasterizer
        logger.info("custom_rasterizer is not installed: hy3dgen's renderer uses the torch one")
        return "torch"
