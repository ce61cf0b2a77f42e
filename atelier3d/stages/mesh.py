"""What the mesh stage's Gateway and its Shape3D replicas both hold: the request, formats."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atelier3d.config import FACE_RANGE, OCTREE_RANGE
from atelier3d.errors import BadRequest, Unprocessable, validation_message

GLB = "model/gltf-binary"
# The media type of the result that ends a split mesh job's first half (``Shape3D.shape``): its
# ``surfaces`` is an ObjectRef of the raw surfaces, which the Gateway hands to MeshFinish unread.
SURFACES = "application/x-atelier3d-surfaces"

# What ``GET /v1/jobs/{id}/result?format=`` offers for a mesh; all are converted from the GLB.
FORMATS = {"glb": GLB, "obj": "model/obj", "ply": "application/ply", "stl": "model/stl"}

MeshFormat = Literal["glb", "obj", "ply", "stl"]

MIN_BOX_PX = 32  # a cut-out smaller than this has too few pixels for the image encoder

MAX_PARTS = 16


def alpha_box(rgba: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (exclusive ends) of the pixels with alpha > 0, as hy3dgen's image
    processor crops them; ``None`` when there are none."""
    rows = np.flatnonzero(rgba[..., 3].any(axis=1))
    cols = np.flatnonzero(rgba[..., 3].any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_cutout(rgba: object, what: str) -> np.ndarray:
    if not (isinstance(rgba, np.ndarray) and rgba.ndim == 3 and rgba.dtype == np.uint8
            and rgba.size):
        raise BadRequest(f"{what} must be an (H, W, 4) uint8 RGBA array")
    if rgba.shape[2] != 4 or rgba[..., 3].min() == 255:
        raise BadRequest(f"{what} has no transparency: send a cut-out (RGBA, background "
                         "transparent), or a session and a mask to cut it out")
    box = alpha_box(rgba)
    if box is None:
        raise Unprocessable(f"{what} is fully transparent: the cut-out is empty")
    x0, y0, x1, y1 = box
    if max(x1 - x0, y1 - y0) < MIN_BOX_PX or min(x1 - x0, y1 - y0) < 2:
        raise Unprocessable(f"{what}: the cut-out is {x1 - x0}x{y1 - y0} px; at least "
                            f"{MIN_BOX_PX} px on its longer side are needed")
    return rgba


class MeshRequest(BaseModel):
    """One image-to-3D job: a cut-out, or the parts of a layered asset cut from one image.

    ``None`` parameters take the server's defaults (:class:`MeshSettings`). Build it with
    :meth:`build`, which turns every validation failure into a 400/422 ``ApiError``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    image: np.ndarray | None = Field(None, description="(H, W, 4) uint8; alpha is the cut-out")
    parts: list[tuple[str, np.ndarray]] | None = Field(
        None, description="(name, RGBA) per part, all the full image's size so they line up"
    )
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=30, allow_inf_nan=False)
    octree_resolution: int | None = Field(None, ge=OCTREE_RANGE[0], le=OCTREE_RANGE[1])
    num_chunks: int | None = Field(None, ge=1000, le=10_000_000)
    target_face_count: int | None = Field(None, ge=FACE_RANGE[0], le=FACE_RANGE[1])
    texture: bool = True

    @model_validator(mode="after")
    def _check_images(self) -> MeshRequest:
        # ApiErrors are not ValueErrors, so pydantic lets them through unwrapped.
        if (self.image is None) == (self.parts is None):
            raise BadRequest("give either an image or parts, not both or neither")
        if self.image is not None:
            _check_cutout(self.image, "the image")
            return self
        if not 1 <= len(self.parts) <= MAX_PARTS:
            raise BadRequest(f"a layered asset has 1 to {MAX_PARTS} parts, not {len(self.parts)}")
        names = [name.strip() for name, _ in self.parts]
        if not all(names):
            raise BadRequest("every part needs a non-empty name")
        if len(set(names)) != len(names):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            raise BadRequest(f"part names must be unique; repeated: {', '.join(duplicated)}")
        for name, rgba in self.parts:
            _check_cutout(rgba, f"part {name!r}")
        if len({rgba.shape[:2] for _, rgba in self.parts}) > 1:
            raise BadRequest("all parts must have the full image's size, so they line up")
        return self

    @classmethod
    def build(cls, **fields: object) -> MeshRequest:
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise Unprocessable(validation_message(exc.errors())) from None

    def named_images(self) -> list[tuple[str, np.ndarray]]:
        """The parts, or the single image as one part named ``mesh``."""
        return self.parts if self.parts is not None else [("mesh", self.image)]


def convert_mesh(glb: bytes, fmt: MeshFormat) -> bytes:
    """A GLB as ``fmt``. OBJ keeps one object per part; PLY and STL hold one mesh, so the parts
    are merged (with their node transforms applied). Vertex colours survive in OBJ and PLY."""
    import trimesh

    if fmt not in FORMATS:
        raise BadRequest(f"unknown mesh format {fmt!r} (use: {', '.join(FORMATS)})")
    if fmt == "glb":
        return glb
    scene = trimesh.load(io.BytesIO(glb), file_type="glb", force="scene", process=False)
    if fmt == "obj":
        return scene.export(file_type="obj", include_texture=False).encode()
    data = scene.to_mesh().export(file_type=fmt)
    return data if isinstance(data, bytes) else data.encode()
