"""The fast mesh clean-up against hy3dgen's pymeshlab path (the reference): the same floaters
removed, and the issue's quality bound on a small analytic character surface."""

from __future__ import annotations

import numpy as np
import pymeshlab
import pytest
import trimesh
from hy3dgen.shapegen.postprocessors import remove_floater

from atelier3d.config import MeshSettings
from atelier3d.models.mesh import hunyuan3d as H
from atelier3d.optimizations import mesh_cleanup as C
from atelier3d.optimizations.mesh_samples import character_surface, compare
from atelier3d.stages.mesh import MeshRequest

GRID, TARGET = 96, 6000


@pytest.fixture(scope="module")
def surface() -> trimesh.Trimesh:
    return character_surface(GRID)


def pymeshlab_floaters_removed(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    meshset = pymeshlab.MeshSet()
    meshset.add_mesh(pymeshlab.Mesh(vertex_matrix=np.asarray(mesh.vertices, np.float64),
                                    face_matrix=np.asarray(mesh.faces, np.int32)))
    remove_floater(meshset)
    return meshset.current_mesh().vertex_matrix(), meshset.current_mesh().face_matrix()


def test_floaters_are_the_ones_hy3dgen_removes(surface):
    sizes = np.bincount(C.face_components(surface.faces))
    assert len(sizes) > 2  # the body, the cape, and floaters to remove
    faces = C.remove_floaters(surface.vertices, np.asarray(surface.faces, np.int64))
    vertices, faces = C.remove_unreferenced_vertices(np.asarray(surface.vertices), faces)
    ref_vertices, ref_faces = pymeshlab_floaters_removed(surface)
    assert np.array_equal(faces, ref_faces)
    np.testing.assert_array_equal(vertices, ref_vertices)


def test_floater_ratio_is_relative_to_the_largest_component():
    big = trimesh.creation.icosphere(subdivisions=5)  # 20480 faces: the threshold is 102.4
    kept = trimesh.creation.icosphere(subdivisions=2).apply_translation([3, 0, 0])  # 320
    dropped = trimesh.creation.icosphere(subdivisions=1).apply_translation([-3, 0, 0])  # 80
    mesh = trimesh.util.concatenate([big, kept, dropped])
    faces = C.remove_floaters(mesh.vertices, np.asarray(mesh.faces, np.int64))
    assert len(faces) == 20480 + 320
    # the dropped sphere is last: the others' vertex indices are unchanged in both
    assert np.array_equal(faces, pymeshlab_floaters_removed(mesh)[1])


def test_fast_clean_up_meets_the_quality_bound(surface):
    reference = H.postprocess(surface.copy(), TARGET, "pymeshlab")
    fast = H.postprocess(surface.copy(), TARGET, "fast")
    quality = compare(fast, reference)
    assert abs(quality.faces - TARGET) <= 0.02 * TARGET
    assert quality.chamfer_over_diagonal <= 0.005
    assert C.non_manifold_edges(surface.faces) == 0
    assert quality.non_manifold_edges == 0
    assert quality.components == compare(reference, reference).components == 2
    assert not np.array_equal(fast.vertices[:10], reference.vertices[:10])  # not the same code
    # no degenerate faces left
    corners = fast.vertices[fast.faces]
    assert (np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0],
                                    corners[:, 2] - corners[:, 0]), axis=1) > 0).all()


def test_below_the_target_only_floaters_and_degenerate_faces_go(surface):
    faces = np.asarray(surface.faces, np.int64)
    with_degenerate = trimesh.Trimesh(surface.vertices,
                                      np.vstack([faces, [[0, 0, 1], [5, 6, 5]]]), process=False)
    out = C.clean_up(with_degenerate, len(faces) + 10)
    assert len(out.faces) == len(pymeshlab_floaters_removed(surface)[1])


def test_folded_pairs_go_and_duplicates_keep_one():
    faces = np.array([[0, 1, 2], [2, 1, 0], [3, 4, 5], [4, 5, 3], [5, 3, 4], [6, 7, 8]])
    assert C.remove_folded_pairs(faces).tolist() == [[3, 4, 5], [6, 7, 8]]


def test_folded_tetrahedra_go():
    # as found after a decimation at grid 512: a closed tetrahedron (0, 1, 2, 3) glued to the
    # surface at edges 0-2 and 1-3, each of which then has four faces
    tetrahedron = [[0, 1, 2], [3, 2, 1], [1, 0, 3], [2, 3, 0]]
    around = [[2, 0, 4], [2, 5, 0], [1, 3, 6], [1, 7, 3]]
    faces = np.array(around[:2] + tetrahedron + around[2:])
    assert C.non_manifold_edges(faces) == 2
    out = C.remove_folded_tetrahedra(faces)
    assert out.tolist() == around and C.non_manifold_edges(out) == 0


def test_the_default_is_the_fast_path():
    assert MeshSettings().postprocess == "fast"
    image = np.zeros((64, 64, 4), np.uint8)
    image[8:56, 8:56] = 255
    request = MeshRequest.build(image=image)
    assert H.resolve_params(request, MeshSettings()).postprocess == "fast"
    assert H.resolve_params(request, MeshSettings(postprocess="pymeshlab")).postprocess \
        == "pymeshlab"
