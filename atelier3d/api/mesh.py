"""Image-to-3D jobs: one mesh, or a layered asset with a node per part."""

from __future__ import annotations

from pydantic import Field

from atelier3d.api.common import ApiModel, FiniteFloat, ImageSource


class MeshPart(ApiModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\- ]+$")
    source: ImageSource


class MeshOptions(ApiModel):
    """A mesh's parameters (``None``: the server's), as a mesh job and the Character to 3D job's
    mesh stage take them."""

    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = None
    guidance_scale: FiniteFloat | None = None
    octree_resolution: int | None = None
    num_chunks: int | None = None
    target_face_count: int | None = None
    texture: bool = True


class MeshJobRequest(MeshOptions):
    session_id: str | None = Field(None, description="needed unless the image is uploaded")
    source: ImageSource = Field(
        default_factory=lambda: ImageSource(kind="original"),
        description="an image with alpha (a cut-out); without alpha, SAM cuts the character "
        "out first")
    parts: list[MeshPart] | None = Field(
        None, max_length=16, description="layered asset: one mesh per part, one GLB with a "
        "node per part, aligned as in the image (replaces source)")
