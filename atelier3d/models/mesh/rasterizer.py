"""A torch triangle rasterizer with the interface and results of hy3dgen's ``custom_rasterizer``.

hy3dgen's texture renderer (``MeshRender``) calls ``custom_rasterizer.rasterize(pos, tri,
resolution)`` and ``custom_rasterizer.interpolate(col, findices, barycentric, tri)``; the package
that provides them is a CUDA extension compiled from source, which no package registry ships.
This module computes the same thing with torch operations, so it runs wherever torch runs (the
CPU in tests, any CUDA GPU), and ``atelier3d.models.mesh.paint`` registers it under that name
where the compiled one is missing.

The algorithm is the extension's, step for step, in float32 like its kernel:

- clip-space vertices go to the screen as ``x = (x/w * 0.5 + 0.5) * (width - 1) + 0.5``,
  ``y = (0.5 + 0.5 * y/w) * (height - 1) + 0.5`` (row ``y``, no flip), ``z = z/w * 0.49999 + 0.5``;
- a pixel belongs to a triangle when its centre ``(px + 0.5, py + 0.5)`` has screen-space
  barycentrics all in ``[0, 1]`` (edges inclusive, both windings, zero-area faces never);
- the depth there is quantised, ``int(z * 2**18)``, and the pixel keeps the face with the
  smallest ``(quantised depth, face index)``: nearest wins, the lower index on a tie; a depth
  below 0 (or below the depth prior, when one is given) is discarded;
- ``findices`` holds face index + 1 (0 = empty) and the barycentrics are recomputed at the pixel
  centre and corrected for perspective (divided by each vertex's ``w``, renormalised).

Work is done per face over its screen bounding box, in chunks of candidate pixels, so memory stays
bounded at the texture sizes hy3dgen uses (2048²).
"""

from __future__ import annotations

import torch

MAXINT = 2147483647  # the kernel's token base: token = quantised depth * MAXINT + face index + 1
_EMPTY = MAXINT * MAXINT + (MAXINT - 1)  # the kernel's z-buffer initial value
_DEPTH_SCALE = float(2 << 17)
_OCCLUSION_TRUNCATION = 1e-6  # what custom_rasterizer.rasterize passes to its kernel
CHUNK_PIXELS = 1 << 22  # candidate (face, pixel) pairs tested at once


def _to_screen(pos: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[V, 4] clip coordinates -> [V, 3] screen x, y and depth, in the kernel's float32 order."""
    w = pos[:, 3]
    x = (pos[:, 0] / w * 0.5 + 0.5) * (width - 1) + 0.5
    y = (0.5 + 0.5 * pos[:, 1] / w) * (height - 1) + 0.5
    z = pos[:, 2] / w * 0.49999 + 0.5
    return torch.stack([x, y, z], dim=-1)


def _barycentric(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics of points (px, py) in triangles (a, b, c), each [N, >=2];
    -1 everywhere for a zero-area triangle. Rounded as the kernel rounds: the area ratios in
    float32, ``1 - beta - gamma`` in double (its ``1.0`` is a double literal)."""
    beta_tri = (c[:, 0] - a[:, 0]) * (py - a[:, 1]) - (px - a[:, 0]) * (c[:, 1] - a[:, 1])
    gamma_tri = (px - a[:, 0]) * (b[:, 1] - a[:, 1]) - (b[:, 0] - a[:, 0]) * (py - a[:, 1])
    area = (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]) - (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1])
    # float32(1 / area) is correctly rounded either way; the kernel divides in double
    tri_inv = (1.0 / area.double()).float()
    beta = beta_tri * tri_inv
    gamma = gamma_tri * tri_inv
    alpha = (1.0 - beta.double() - gamma.double()).float()
    bary = torch.stack([alpha, beta, gamma], dim=-1)
    return torch.where((area == 0).unsqueeze(-1), torch.full_like(bary, -1.0), bary)


def _face_boxes(screen_faces: torch.Tensor, width: int,
                height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per face, the pixel ranges the kernel's loops visit, clipped to the image:
    ``for (int px = x_min; px < x_max + 1; ++px)`` (int() truncates toward zero)."""
    lo = screen_faces[..., :2].amin(dim=1)
    hi = screen_faces[..., :2].amax(dim=1)
    start = torch.trunc(lo).clamp(min=0)
    stop = torch.ceil(hi + 1)
    size = torch.tensor([width, height], device=lo.device, dtype=lo.dtype)
    stop = torch.minimum(stop, size)
    finite = torch.isfinite(screen_faces).all(dim=2).all(dim=1)
    extent = (stop - start).clamp(min=0) * finite.unsqueeze(-1)
    start = torch.where(finite.unsqueeze(-1), start, torch.zeros_like(start))
    x0, y0 = start[:, 0].long(), start[:, 1].long()
    return x0, y0, extent[:, 0].long(), extent[:, 1].long()


def rasterize_image(vertices: torch.Tensor, faces: torch.Tensor, depth_prior: torch.Tensor,
                    width: int, height: int, occlusion_truncation: float,
                    use_depth_prior: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel entry point: [V, 4] clip vertices, [F, 3] faces -> findices [H, W] int32
    (face + 1, 0 = empty) and perspective-correct barycentrics [H, W, 3] float32."""
    device = vertices.device
    pos = vertices.float()
    tri = faces.long()
    screen = _to_screen(pos, width, height)
    screen_faces = screen[tri]  # [F, 3, 3]
    x0, y0, box_w, box_h = _face_boxes(screen_faces, width, height)
    counts = box_w * box_h

    zbuffer = torch.full((height * width,), _EMPTY, dtype=torch.int64, device=device)
    prior = depth_prior.float().reshape(-1) if use_depth_prior else None
    face_ids = torch.nonzero(counts > 0).squeeze(1)
    totals = torch.cumsum(counts[face_ids], 0)
    begin = 0
    while begin < face_ids.numel():
        # the faces whose candidates fit in one chunk (always at least one face)
        base = int(totals[begin - 1]) if begin else 0
        end = int(torch.searchsorted(totals, base + CHUNK_PIXELS, right=True))
        end = max(end, begin + 1)
        chunk = face_ids[begin:end]
        begin = end
        n = counts[chunk]
        owner = torch.repeat_interleave(torch.arange(chunk.numel(), device=device), n)
        offsets = torch.cumsum(n, 0) - n
        local = torch.arange(int(n.sum()), device=device) - offsets[owner]
        face = chunk[owner]
        px = x0[face] + local % box_w[face]
        py = y0[face] + local // box_w[face]
        tri_screen = screen_faces[face]
        bary = _barycentric(tri_screen[:, 0], tri_screen[:, 1], tri_screen[:, 2],
                            px.float() + 0.5, py.float() + 0.5)
        inside = ((bary >= 0) & (bary <= 1)).all(dim=-1)
        depth = (bary[:, 0] * tri_screen[:, 0, 2] + bary[:, 1] * tri_screen[:, 1, 2]
                 + bary[:, 2] * tri_screen[:, 2, 2])
        pixel = py * width + px
        if prior is not None:
            threshold = prior[pixel] * 0.49999 + 0.5 + occlusion_truncation
        else:
            threshold = torch.zeros_like(depth)
        keep = inside & ~(depth < threshold)
        token = (depth[keep] * _DEPTH_SCALE).to(torch.int32).long() * MAXINT + face[keep] + 1
        zbuffer.scatter_reduce_(0, pixel[keep], token, reduce="amin")

    winner = zbuffer % MAXINT
    covered = winner != MAXINT - 1
    findices = torch.where(covered, winner, torch.zeros_like(winner))
    barycentric = torch.zeros(height * width, 3, dtype=torch.float32, device=device)
    pixels = torch.nonzero(covered).squeeze(1)
    if pixels.numel():
        face = findices[pixels] - 1
        tri_screen = screen_faces[face]
        bary = _barycentric(tri_screen[:, 0], tri_screen[:, 1], tri_screen[:, 2],
                            (pixels % width).float() + 0.5, (pixels // width).float() + 0.5)
        bary = bary / pos[tri[face], 3]
        bary = bary * (1.0 / bary.sum(dim=-1, keepdim=True))
        barycentric[pixels] = bary
    return (findices.to(torch.int32).reshape(height, width),
            barycentric.reshape(height, width, 3))


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int] | list[int],
              clamp_depth: torch.Tensor | None = None,
              use_depth_prior: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``custom_rasterizer.rasterize``: pos [1, V, 4] clip coordinates, tri [F, 3],
    resolution (height, width) -> findices [H, W], barycentric [H, W, 3]."""
    if pos.device != tri.device:
        raise ValueError("pos and tri must be on the same device")
    depth_prior = clamp_depth if clamp_depth is not None else torch.zeros(0)
    return rasterize_image(pos[0], tri, depth_prior, int(resolution[1]), int(resolution[0]),
                           _OCCLUSION_TRUNCATION, use_depth_prior)


def interpolate(col: torch.Tensor, findices: torch.Tensor, barycentric: torch.Tensor,
                tri: torch.Tensor) -> torch.Tensor:
    """``custom_rasterizer.interpolate``: per-vertex attributes col [1, V, C] at each pixel,
    [1, H, W, C] (empty pixels read face 0, their barycentrics are 0)."""
    face = findices - 1 + (findices == 0)
    vertex_values = col[0, tri.long()[face.long()]]
    result = torch.sum(barycentric.view(*barycentric.shape, 1) * vertex_values, dim=-2)
    return result.view(1, *result.shape)
