"""The torch rasterizer that stands in for hy3dgen's compiled ``custom_rasterizer``: equal to a
brute-force scalar reference of the kernel's algorithm (face index, barycentrics, depth) on test
meshes, and driving hy3dgen's own ``MeshRender`` on the CPU through the adapter."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import trimesh

from atelier3d.models.mesh import rasterizer
from atelier3d.models.mesh.paint import RASTERIZER_MODULE, install_rasterizer

F32 = np.float32


def _area2(a, b, c):
    return F32((c[0] - a[0]) * (b[1] - a[1]) - (b[0] - a[0]) * (c[1] - a[1]))


def _bary(a, b, c, p):
    """The kernel's calculateBarycentricCoordinate, scalar float32 (its 1.0 literals double)."""
    beta_tri, gamma_tri, area = _area2(a, p, c), _area2(a, b, p), _area2(a, b, c)
    if area == 0:
        return [F32(-1), F32(-1), F32(-1)]
    tri_inv = F32(1.0 / float(area))
    beta, gamma = F32(beta_tri * tri_inv), F32(gamma_tri * tri_inv)
    return [F32(1.0 - float(beta) - float(gamma)), beta, gamma]


def reference_rasterize(pos: np.ndarray, faces: np.ndarray, height: int, width: int,
                        prior: np.ndarray | None = None):
    """Every face against every pixel centre, one at a time: the kernel's rules written plainly.
    Returns findices (face + 1), barycentrics and the winning (unquantised) screen depth."""
    pos = pos.astype(F32)
    screen = []
    for x, y, z, w in pos:
        screen.append((F32(F32(F32(F32(x / w) * F32(0.5)) + F32(0.5)) * F32(width - 1)) + F32(0.5),
                       F32(F32(F32(0.5) + F32(F32(0.5) * y) / w) * F32(height - 1)) + F32(0.5),
                       F32(F32(F32(z / w) * F32(0.49999)) + F32(0.5))))
    best = np.full((height, width), np.iinfo(np.int64).max, dtype=np.int64)
    best_depth = np.zeros((height, width), F32)
    for f, (i, j, k) in enumerate(faces):
        a, b, c = screen[i], screen[j], screen[k]
        for py in range(height):
            for px in range(width):
                bary = _bary(a, b, c, (F32(px + 0.5), F32(py + 0.5)))
                if not all(0 <= v <= 1 for v in bary):
                    continue
                depth = F32(F32(F32(bary[0] * a[2]) + F32(bary[1] * b[2])) + F32(bary[2] * c[2]))
                threshold = F32(0) if prior is None else F32(
                    F32(F32(prior[py, px] * F32(0.49999)) + F32(0.5)) + F32(1e-6))
                if depth < threshold:
                    continue
                token = int(np.trunc(depth * F32(2 << 17))) * rasterizer.MAXINT + f + 1
                if token < best[py, px]:
                    best[py, px], best_depth[py, px] = token, depth
    findices = np.zeros((height, width), np.int32)
    barycentric = np.zeros((height, width, 3), F32)
    for py in range(height):
        for px in range(width):
            if best[py, px] == np.iinfo(np.int64).max:
                continue
            f = int(best[py, px] % rasterizer.MAXINT) - 1
            findices[py, px] = f + 1
            i, j, k = faces[f]
            bary = _bary(screen[i], screen[j], screen[k], (F32(px + 0.5), F32(py + 0.5)))
            bary = [F32(bary[0] / pos[i, 3]), F32(bary[1] / pos[j, 3]), F32(bary[2] / pos[k, 3])]
            norm = F32(1.0 / float(F32(F32(bary[0] + bary[1]) + bary[2])))
            barycentric[py, px] = [F32(v * norm) for v in bary]
    return findices, barycentric, best_depth


def _grid_triangles(rng: np.random.Generator, height: int, width: int, n: int) -> np.ndarray:
    """Clip-space triangles whose vertices sit on pixel centres: edges pass exactly through
    pixel centres (inclusive edges), faces share depths (ties go to the lower index)."""
    cols = rng.integers(-2, width + 2, size=(n, 3))
    rows = rng.integers(-2, height + 2, size=(n, 3))
    x = (cols.astype(F32) / (width - 1)) * 2 - 1
    y = (rows.astype(F32) / (height - 1)) * 2 - 1
    z = rng.choice(np.array([-0.5, 0.0, 0.25, 0.5], F32), size=(n, 3))
    verts = np.stack([x, y, z, np.ones_like(x)], axis=-1).reshape(-1, 4)
    return verts


CASES = {
    "grid-aligned, overlapping, tied depths": (23, 31, 40, 0),
    "random, perspective w, some clipped": (17, 19, 30, 1),
}


def _case(name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    height, width, n, seed = CASES[name]
    rng = np.random.default_rng(seed)
    if seed == 0:
        verts = _grid_triangles(rng, height, width, n)
        # a zero-area face and a sliver: never drawn / drawn only where the kernel draws it
        verts[:3, :2] = verts[0, :2]
        verts[3:6, 0] = verts[3, 0]
    else:
        verts = rng.uniform(-1.3, 1.3, size=(3 * n, 4)).astype(F32)
        verts[:, 3] = rng.uniform(0.5, 2.0, size=3 * n)
        verts[:, 2] = rng.uniform(-1.5, 1.5, size=3 * n) * verts[:, 3]  # some depth < 0: culled
    faces = np.arange(3 * n, dtype=np.int32).reshape(n, 3)
    return verts, faces, height, width


@pytest.mark.parametrize("name", list(CASES))
def test_rasterize_equals_the_brute_force_reference(name, monkeypatch):
    verts, faces, height, width = _case(name)
    want_f, want_b, want_depth = reference_rasterize(verts, faces, height, width)
    # small chunks: a face's candidate pixels split over several scatter passes
    monkeypatch.setattr(rasterizer, "CHUNK_PIXELS", 97)
    findices, bary = rasterizer.rasterize(torch.from_numpy(verts)[None],
                                          torch.from_numpy(faces), (height, width))
    assert findices.dtype == torch.int32 and findices.shape == (height, width)
    assert bary.dtype == torch.float32 and bary.shape == (height, width, 3)
    assert (want_f > 0).sum() > height * width // 3  # the case covers a good part of the image
    np.testing.assert_array_equal(findices.numpy(), want_f)
    np.testing.assert_array_equal(bary.numpy(), want_b)
    # the depth read back through interpolate is the reference's winning depth
    screen_z = torch.from_numpy(verts[:, 2] / verts[:, 3] * F32(0.49999) + F32(0.5))
    if name.startswith("grid"):  # orthographic: screen-space and corrected barycentrics agree
        depth = rasterizer.interpolate(screen_z.reshape(1, -1, 1), findices, bary,
                                       torch.from_numpy(faces))[0, ..., 0].numpy()
        covered = want_f > 0
        np.testing.assert_allclose(depth[covered], want_depth[covered], atol=1e-6)


def test_depth_prior_discards_what_lies_in_front_of_it():
    verts, faces, height, width = _case("grid-aligned, overlapping, tied depths")
    prior = np.full((height, width), 0.1, F32)
    prior[:, : width // 2] = -1.0
    want_f, want_b, _ = reference_rasterize(verts, faces, height, width, prior=prior)
    findices, bary = rasterizer.rasterize(torch.from_numpy(verts)[None],
                                          torch.from_numpy(faces), (height, width),
                                          torch.from_numpy(prior), 1)
    np.testing.assert_array_equal(findices.numpy(), want_f)
    np.testing.assert_array_equal(bary.numpy(), want_b)


def test_interpolate_blends_vertex_attributes_by_barycentrics():
    verts, faces, height, width = _case("random, perspective w, some clipped")
    findices, bary = rasterizer.rasterize(torch.from_numpy(verts)[None],
                                          torch.from_numpy(faces), (height, width))
    colours = torch.rand(1, len(verts), 3)
    out = rasterizer.interpolate(colours, findices, bary, torch.from_numpy(faces))
    assert out.shape == (1, height, width, 3)
    for py, px in [(3, 4), (9, 9), (12, 15)]:
        f = int(findices[py, px])
        if f == 0:
            assert torch.all(out[0, py, px] == 0)
        else:
            want = (bary[py, px, :, None] * colours[0, faces[f - 1]]).sum(0)
            torch.testing.assert_close(out[0, py, px], want)


def test_hy3dgen_mesh_render_runs_on_the_cpu_through_the_adapter():
    """hy3dgen's MeshRender imports custom_rasterizer; with the adapter it renders a sphere's
    normals and positions, and bakes a view into a UV texture, on the CPU."""
    assert install_rasterizer() in ("torch", "compiled")
    assert RASTERIZER_MODULE in sys.modules
    from hy3dgen.texgen.differentiable_renderer.mesh_render import MeshRender
    from hy3dgen.texgen.utils.uv_warp_utils import mesh_uv_wrap

    render = MeshRender(default_resolution=48, texture_size=32, device="cpu")
    mesh = mesh_uv_wrap(trimesh.creation.icosphere(subdivisions=1))
    render.load_mesh(mesh)
    normal = np.asarray(render.render_normal(0, 0, use_abs_coor=True, return_type="np"))
    position = np.asarray(render.render_position(0, 0, return_type="np"))
    assert normal.shape == (48, 48, 3) and position.shape == (48, 48, 3)
    # the sphere fills a disc in the middle: covered there, background (white) in the corners
    assert np.all(position[0, 0] == 1.0) and not np.all(position[24, 24] == 1.0)
    view = np.full((48, 48, 3), 0.25, np.float32)
    texture, cos_map, _ = render.back_project(torch.from_numpy(view), 0, 0)
    painted = cos_map[..., 0] > 0
    assert painted.any()
    np.testing.assert_allclose(texture[painted].numpy(), 0.25, rtol=1e-5)
