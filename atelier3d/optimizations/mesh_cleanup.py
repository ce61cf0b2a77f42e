"""Fast mesh clean-up: the result class of hy3dgen's pymeshlab post-processing, in numpy/scipy and
Fast-Quadric-Mesh-Simplification (``fast_simplification``).

hy3dgen (``hy3dgen.shapegen.postprocessors``, as its API server chains them) runs three steps,
kept here with the same semantics:

- ``remove_floater``: pymeshlab's "select small disconnected components" with ``nbfaceratio``
  0.005 selects every component (faces joined through shared edges) with fewer faces than 0.5%
  of the largest component's; the selection is moved to vertices non-inclusively (a vertex of
  any selected face), and those vertices and every face touching one are deleted.
- the degenerate-face step: faces that repeat a vertex or have no area are dropped.
- ``reduce_face``: quadric edge-collapse decimation to the target face count, only when the mesh
  has more faces than that. pymeshlab's keeps the topology; Fast-Quadric-Mesh-Simplification
  does not check it and, on thin shells, now and then folds the two sides onto one another
  (two faces on the same three vertices, opposite ways round: a non-manifold fin; or four faces
  closing a tetrahedron on two non-manifold edges). Those pockets are dropped after it, with the
  degenerate faces it leaves.

The reference path stays in ``atelier3d.models.mesh.hunyuan3d.postprocess_pymeshlab``;
``benchmarks/mesh_postprocess.py`` measures both on the same surfaces.
"""

from __future__ import annotations

from collections.abc import Callable

import fast_simplification
import numpy as np
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

FLOATER_FACE_RATIO = 0.005  # hy3dgen's remove_floater: nbfaceratio
AGGRESSIVENESS = 7.0  # Fast-Quadric-Mesh-Simplification's default

Decimator = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _edges(faces: np.ndarray) -> np.ndarray:
    """Every face's three edges as one int64 key each (smaller index first), face-major."""
    a = faces[:, [0, 1, 2]].reshape(-1).astype(np.int64)
    b = faces[:, [1, 2, 0]].reshape(-1).astype(np.int64)
    low, high = np.minimum(a, b), np.maximum(a, b)
    return low * (int(faces.max(initial=0)) + 1) + high


def face_components(faces: np.ndarray) -> np.ndarray:
    """A component label per face (0..n-1); faces are joined through shared edges, as
    vcglib's face-face adjacency joins them (a non-manifold edge joins all its faces)."""
    n = len(faces)
    if n == 0:
        return np.zeros(0, np.int64)
    keys = _edges(faces)
    order = np.argsort(keys)
    same = keys[order[1:]] == keys[order[:-1]]
    # consecutive sorted entries with one key: their faces share that edge
    a, b = order[1:][same] // 3, order[:-1][same] // 3
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def non_manifold_edges(faces: np.ndarray) -> int:
    """How many edges more than two faces share."""
    _, counts = np.unique(_edges(faces), return_counts=True)
    return int((counts > 2).sum())


def remove_floaters(vertices: np.ndarray, faces: np.ndarray,
                    ratio: float = FLOATER_FACE_RATIO) -> np.ndarray:
    """The faces hy3dgen's ``remove_floater`` keeps (see the module's docstring)."""
    labels = face_components(faces)
    sizes = np.bincount(labels)
    small = sizes < ratio * sizes.max()
    if not small.any():
        return faces
    doomed = np.zeros(len(vertices), bool)
    doomed[faces[small[labels]].reshape(-1)] = True
    return faces[~doomed[faces].any(axis=1)]


def remove_degenerate_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces that name three distinct vertices and have a non-zero area."""
    distinct = ((faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2])
                & (faces[:, 2] != faces[:, 0]))
    origin = vertices[faces[:, 0]]
    u, v = vertices[faces[:, 1]] - origin, vertices[faces[:, 2]] - origin
    # the cross product's components, spelled out (np.cross is several times slower)
    has_area = ((u[:, 1] * v[:, 2] != u[:, 2] * v[:, 1])
                | (u[:, 2] * v[:, 0] != u[:, 0] * v[:, 2])
                | (u[:, 0] * v[:, 1] != u[:, 1] * v[:, 0]))
    return faces[distinct & has_area]


def remove_folded_pairs(faces: np.ndarray) -> np.ndarray:
    """Drops faces that repeat another's three vertices: a pair with opposite orientations is a
    zero-volume fin (decimation folds the two sides of a thin shell onto each other), so both go;
    copies with one orientation keep one."""
    ordered = np.sort(faces, axis=1)
    _, first, inverse, counts = np.unique(ordered, axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if (counts == 1).all():
        return faces
    # a face's orientation: whether sorting its indices is an even permutation (a rotation)
    even = ((faces[:, 0] == ordered[:, 0]) & (faces[:, 1] == ordered[:, 1])
            | (faces[:, 1] == ordered[:, 0]) & (faces[:, 2] == ordered[:, 1])
            | (faces[:, 2] == ordered[:, 0]) & (faces[:, 0] == ordered[:, 1]))
    evens = np.bincount(inverse, weights=even, minlength=len(counts))
    mixed = (evens > 0) & (evens < counts)
    keep = (np.arange(len(faces)) == first[inverse]) & ~mixed[inverse]
    return faces[keep]


def remove_folded_tetrahedra(faces: np.ndarray, max_suspects: int = 512) -> np.ndarray:
    """Drops closed tetrahedra of faces that sit on non-manifold edges: a thin shell's two sides
    folded into a four-face pocket, glued to the rest at two opposite edges (each then has four
    faces). Without them the surface around is closed and those edges have two faces again.
    Only faces on a non-manifold edge are looked at (a handful after a decimation)."""
    _, inverse, counts = np.unique(_edges(faces), return_inverse=True, return_counts=True)
    suspects = np.flatnonzero((counts[inverse.reshape(-1)] > 2).reshape(-1, 3).any(axis=1))
    if not 0 < len(suspects) <= max_suspects:
        return faces
    triples = {int(i): frozenset(faces[i].tolist()) for i in suspects}
    drop: set[int] = set()
    for i in suspects:
        for j in suspects:
            corners = triples[i] | triples[j]
            if j <= i or len(corners) != 4:
                continue
            members = [k for k, triple in triples.items() if triple <= corners]
            if len({triples[k] for k in members}) == len(members) == 4:
                drop.update(members)
    if not drop:
        return faces
    keep = np.ones(len(faces), bool)
    keep[list(drop)] = False
    return faces[keep]


def decimate_quadric(vertices: np.ndarray, faces: np.ndarray,
                     target: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation (Fast-Quadric-Mesh-Simplification) to ``target``
    faces."""
    points, triangles = fast_simplification.simplify(vertices, faces, target_count=target,
                                                     agg=AGGRESSIVENESS)
    return points, triangles.astype(np.int64)


def remove_unreferenced_vertices(vertices: np.ndarray,
                                 faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops unreferenced vertices, keeping the others' order."""
    used = np.zeros(len(vertices), bool)
    used[faces.reshape(-1)] = True
    index = np.cumsum(used) - 1
    return vertices[used], index[faces]


CLEANUP_STEPS = 3  # floaters and degenerate faces, decimation, the repair after it


def clean_up(mesh: trimesh.Trimesh, max_faces: int, decimate: Decimator = decimate_quadric,
             on_step: Callable[[int, int], None] = lambda step, steps: None) -> trimesh.Trimesh:
    """Floaters removed, degenerate faces removed, reduced to ``max_faces`` when above it.
    ``on_step(i, CLEANUP_STEPS)`` after each step (the last two also when no decimation was
    needed, so every mesh reports the same steps)."""
    vertices = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces, np.int64)
    faces = remove_degenerate_faces(vertices, remove_floaters(vertices, faces))
    vertices, faces = remove_unreferenced_vertices(vertices, faces)
    on_step(1, CLEANUP_STEPS)
    decimated = len(faces) > max_faces
    if decimated:
        vertices, faces = decimate(vertices, faces, max_faces)
    on_step(2, CLEANUP_STEPS)
    if decimated:
        faces = remove_folded_pairs(remove_degenerate_faces(vertices, faces))
        faces = remove_folded_tetrahedra(faces)
        vertices, faces = remove_unreferenced_vertices(vertices, faces)
    on_step(3, CLEANUP_STEPS)
    return trimesh.Trimesh(vertices, faces, process=False)
