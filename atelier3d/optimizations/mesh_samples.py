"""Analytic test surfaces and the measures mesh clean-ups are compared by.

``character_surface(grid)`` is the marching-cubes surface of a character-like signed distance
field (head, torso, arms, legs, a thin two-tier skirt, a thin cape apart from the body, and
small floaters) in hy3dgen's frame: y up, inside ``[-1.01, 1.01]^3``, iso-level 0. It stands in
for a Hunyuan3D-2 surface: a large closed body, thin shells, a second part large enough to keep,
and specks the floater removal must drop. The benchmark (``benchmarks/mesh_postprocess.py``) and
the tests (``tests/test_mesh_cleanup.py``) build their surfaces here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pymeshlab
import trimesh
from skimage.measure import marching_cubes

from atelier3d.optimizations.mesh_cleanup import face_components, non_manifold_edges

BOUNDS = 1.01  # hy3dgen's default box, as models/hunyuan3d.BOX_V
# (centre, radius): spheres well apart from the body and each other; their face counts at grid
# 256 are far below hy3dgen's floater threshold (0.5% of the largest component's faces).
FLOATERS = (((0.62, 0.55, 0.30), 0.035), ((-0.66, -0.45, -0.25), 0.025),
            ((0.45, -0.88, 0.42), 0.02), ((-0.30, 0.80, -0.40), 0.015))


def _length(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", v, v))


def _capsule(p: np.ndarray, a: tuple, b: tuple, radius: float) -> np.ndarray:
    a_, b_ = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ab = b_ - a_
    t = np.clip(((p - a_) @ ab) / float(ab @ ab), 0.0, 1.0)
    return _length(p - (a_ + t[..., None] * ab)) - radius


def _ellipsoid(p: np.ndarray, centre: tuple, radii: tuple) -> np.ndarray:
    # the usual bound-preserving approximation: exact on the axes, close enough for a level set
    q = (p - np.asarray(centre, np.float32)) / np.asarray(radii, np.float32)
    k = _length(q)
    return (k - 1.0) * min(radii)


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _skirt(p: np.ndarray, top: tuple[float, float], hem: tuple[float, float],
           thickness: float) -> np.ndarray:
    """A thin flared shell: the distance, in the (radius, y) half-plane, to the segment from
    ``top`` to ``hem``, less half the thickness; revolved about the y axis."""
    radial = _length(p[..., [0, 2]])
    q = np.stack([radial, p[..., 1]], axis=-1)
    a, b = np.asarray(top, np.float32), np.asarray(hem, np.float32)
    ab = b - a
    t = np.clip(((q - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return _length(q - (a + t[..., None] * ab)) - thickness / 2


def _cape(p: np.ndarray) -> np.ndarray:
    """A thin shell hanging behind the shoulders, apart from the body: the distance to an arc
    (radius 0.34 about the y axis, 120 degrees behind the back) swept from y=0.5 to y=0.0."""
    angle = np.arctan2(-p[..., 2], p[..., 0])  # 90 degrees straight behind
    on_arc = np.clip(angle, np.pi / 6, 5 * np.pi / 6)
    arc = np.stack([0.34 * np.cos(on_arc), -0.34 * np.sin(on_arc)], axis=-1)
    y = np.clip(p[..., 1], 0.0, 0.5)
    return np.sqrt(((p[..., [0, 2]] - arc) ** 2).sum(-1) + (p[..., 1] - y) ** 2) - 0.0125


def character_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance (a 1-Lipschitz approximation) to the character at points ``p`` (..., 3);
    negative inside."""
    body = _ellipsoid(p, (0.0, 0.22, 0.0), (0.24, 0.36, 0.15))  # torso
    parts = [
        _capsule(p, (0.0, 0.55, 0.0), (0.0, 0.66, 0.0), 0.06),  # neck
        _ellipsoid(p, (0.0, 0.78, 0.02), (0.13, 0.16, 0.14)),  # head
        _capsule(p, (-0.22, 0.46, 0.0), (-0.62, 0.05, 0.08), 0.055),  # arms
        _capsule(p, (0.22, 0.46, 0.0), (0.62, 0.05, 0.08), 0.055),
        _capsule(p, (-0.10, -0.05, 0.0), (-0.14, -0.92, 0.02), 0.07),  # legs
        _capsule(p, (0.10, -0.05, 0.0), (0.14, -0.92, 0.02), 0.07),
    ]
    for part in parts:
        body = _smooth_union(body, part, 0.04)
    # a two-tier skirt joined to the waist, a cape apart from the body, the floaters
    body = np.minimum(body, _skirt(p, (0.15, 0.0), (0.44, -0.45), 0.03))
    body = np.minimum(body, _skirt(p, (0.15, 0.0), (0.52, -0.62), 0.03))
    body = np.minimum(body, _cape(p))
    for centre, radius in FLOATERS:
        body = np.minimum(body, _length(p - np.asarray(centre, np.float32)) - radius)
    return body


def sample_volume(sdf: Callable[[np.ndarray], np.ndarray], grid: int,
                  brick: int = 8) -> np.ndarray:
    """``sdf`` on ``(grid + 1)^3`` points spanning ``[-BOUNDS, BOUNDS]^3``, brick by brick: a
    brick whose centre is farther from the surface than its half-diagonal plus two cells holds
    no crossing, nor does any edge to its neighbours, so it takes that centre's value (the sign
    is all marching cubes reads there) and only bricks near the surface are sampled in full."""
    cell = 2 * BOUNDS / grid
    size = -(-(grid + 1) // brick) * brick  # whole bricks; the overhang is cut off at the end
    axis = (-BOUNDS + cell * np.arange(size)).astype(np.float32)
    firsts = axis[::brick]
    centres = np.stack(np.meshgrid(firsts, firsts, firsts, indexing="ij"), axis=-1)
    centres += cell * (brick - 1) / 2
    coarse = sdf(centres)
    near = np.abs(coarse) <= cell * ((brick - 1) * np.sqrt(3) / 2 + 2)
    volume = np.repeat(np.repeat(np.repeat(coarse, brick, 0), brick, 1), brick, 2)
    offsets = np.stack(np.meshgrid(*[np.arange(brick)] * 3, indexing="ij"), axis=-1)
    offsets = offsets.reshape(-1, 3)
    near_index = np.argwhere(near)
    for chunk in np.array_split(near_index, max(1, len(near_index) // 2048)):
        starts = chunk * brick  # (n, 3) first point of each brick
        points = starts[:, None, :] + offsets[None, :, :]  # (n, brick^3, 3) indices
        values = sdf(axis[points])
        for start, block in zip(starts, values, strict=True):
            i, j, k = start
            volume[i:i + brick, j:j + brick, k:k + brick] = block.reshape((brick,) * 3)
    return volume[:grid + 1, :grid + 1, :grid + 1]


def character_surface(grid: int) -> trimesh.Trimesh:
    """Marching cubes (scikit-image) of :func:`character_sdf` sampled on ``(grid + 1)^3`` points
    spanning ``[-BOUNDS, BOUNDS]^3``, as hy3dgen samples its decoded volume."""
    volume = sample_volume(character_sdf, grid)
    vertices, faces, _, _ = marching_cubes(volume, level=0.0, spacing=(2 * BOUNDS / grid,) * 3)
    return trimesh.Trimesh(vertices - BOUNDS, faces[:, ::-1])  # outward normals, as hy3dgen's


@dataclass(frozen=True)
class Comparison:
    """One clean-up's output measured against the reference's (pymeshlab's)."""

    faces: int
    components: int
    non_manifold_edges: int
    chamfer: float  # symmetric: mean distance each way, summed
    chamfer_over_diagonal: float  # chamfer / the reference's bounding-box diagonal


def _mean_distance(sampled: trimesh.Trimesh, target: trimesh.Trimesh, samples: int) -> float:
    """Mean distance from points sampled uniformly on ``sampled``'s faces to ``target``'s
    surface (exact point-to-triangle distances: pymeshlab's Hausdorff filter)."""
    meshset = pymeshlab.MeshSet()
    for mesh in (sampled, target):
        meshset.add_mesh(pymeshlab.Mesh(vertex_matrix=np.asarray(mesh.vertices, np.float64),
                                        face_matrix=np.asarray(mesh.faces, np.int32)))
    result = meshset.get_hausdorff_distance(
        sampledmesh=0, targetmesh=1, samplevert=False, sampleface=True, samplenum=samples,
        maxdist=pymeshlab.PercentageValue(100))
    return float(result["mean"])


def chamfer_distance(a: trimesh.Trimesh, b: trimesh.Trimesh, samples: int = 100_000) -> float:
    """Symmetric Chamfer distance: the mean distance from ``a``'s surface to ``b``'s plus the
    mean from ``b``'s to ``a``'s."""
    return _mean_distance(a, b, samples) + _mean_distance(b, a, samples)


def compare(mesh: trimesh.Trimesh, reference: trimesh.Trimesh) -> Comparison:
    chamfer = chamfer_distance(mesh, reference)
    diagonal = float(np.linalg.norm(reference.bounds[1] - reference.bounds[0]))
    return Comparison(faces=len(mesh.faces), components=int(face_components(mesh.faces).max()) + 1,
                      non_manifold_edges=non_manifold_edges(mesh.faces), chamfer=chamfer,
                      chamfer_over_diagonal=chamfer / diagonal)
