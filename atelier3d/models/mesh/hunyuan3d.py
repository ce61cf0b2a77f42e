"""Hunyuan3D-2 image-to-3D with hy3dgen: loading, the tiny profile, and one job's run.

Loading is hy3dgen's own: ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`` of a hub id or a
local directory in the official layout (``<dir>/<subfolder>/config.yaml`` next to
``model.fp16.safetensors``, keys prefixed ``model.``, ``vae.``, ``conditioner.``). The tiny
profile is written in that layout and loaded through the same call; its ``config.yaml`` carries
``atelier3d_random_init``, which is how a loaded model is known to be untrained.

A job runs the pipeline's own steps in its own order: ``__call__`` up to the latents (the
conditioner, then the diffusion loop, whose callback reports each step), then the VAE, its volume
decoder and its surface extractor as ``_export`` chains them. The result is what one
``pipeline(image)`` call returns, with a progress report between the stages.

A job has two halves that need different resources: :func:`extract_surfaces` (conditioning,
denoising, volume decoding, surface extraction: the accelerator) and :func:`finish` (clean-up,
texture projection, GLB export: the CPU). :func:`generate` runs both in one process; the
deployments run them in two (``Shape3D.shape``, ``MeshFinish.finish``), the surfaces handed over
as arrays (:class:`Surfaces`).

Frames: hy3dgen's meshes are y-up, the input view looking at the +z side (its texture renderer
puts the azimuth-0 camera there), x to the right, and the mesh's x/y extent is the cut-out's box
(the image processor crops to it). Vertex colours are projected and parts aligned in that frame.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from atelier3d.config import MeshSettings, ModelsMode, PostprocessMethod
from atelier3d.errors import Unprocessable
from atelier3d.models.loading import (
    file_sha256,
    load_or_tiny,
    resolve_device,
    resolve_dtype,
    tiny_dir,
)
from atelier3d.stages.mesh import GLB, MeshRequest, alpha_box

if TYPE_CHECKING:
    import torch
    import trimesh

logger = logging.getLogger(__name__)

TINY_DIR = "hunyuan3d-tiny-random"
TINY_SUBFOLDER = "hunyuan3d-dit-tiny"
CKPT_NAME = "model.fp16.safetensors"  # what from_pretrained reads (safetensors, variant fp16)
RANDOM_INIT_KEY = "atelier3d_random_init"
BOX_V = 1.01  # the pipeline's default bounds of the decoded volume
STAGES = ("conditioning", "denoise", "volume_decode", "mesh_extraction", "postprocess", "texture")
# Steps reported inside a long stage: the volume decoder's batches of query points come in
# thousands at octree 384; the bar needs a few dozen.
VOLUME_STEPS = 20
SURFACE_STEPS = 2  # marching cubes, then hy3dgen's export to trimesh

# Tiny profile (docs/architecture.md): every part built by hy3dgen's own
# instantiate_from_config; the DINOv2 config is inline, so nothing is downloaded. num_freqs=0
# keeps the decoded field smooth, so marching cubes finds a surface; writing centres that field on
# the iso-level 0.
_TINY_DINO = dict(model_type="dinov2", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=128, patch_size=14, image_size=224)
TINY_CONFIG: dict[str, Any] = {
    "model": {"target": "hy3dgen.shapegen.models.Hunyuan3DDiT", "params": dict(
        in_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=[32], theta=10000, qkv_bias=True, guidance_embed=False)},
    "vae": {"target": "hy3dgen.shapegen.models.ShapeVAE", "params": dict(
        num_latents=64, embed_dim=64, width=64, heads=2, num_decoder_layers=1, num_freqs=0,
        include_pi=False, qkv_bias=False, qk_norm=True, scale_factor=1.0)},
    "conditioner": {"target": "hy3dgen.shapegen.models.SingleImageEncoder", "params": {
        "main_image_encoder": {"type": "DinoImageEncoder", "kwargs": {
            "config": _TINY_DINO, "image_size": 224, "use_cls_token": True}}}},
    "scheduler": {"target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
                  "params": {"num_train_timesteps": 1000}},
    "image_processor": {"target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
                        "params": {"size": 224, "border_ratio": 0.15}},
}
# The distilled VAE FlashVDM swaps in, per shape-model family (as hy3dgen's enable_flashvdm maps
# them), looked up in the same hub repo or local directory.
TURBO_VAES = {"hunyuan3d-dit-v2-mini": "hunyuan3d-vae-v2-mini-turbo",
              "hunyuan3d-dit-v2-0": "hunyuan3d-vae-v2-0-turbo"}
_LOAD_ERRORS = (OSError, RuntimeError, ValueError)  # hub/offline errors are OSError/ValueError


class Reporter(Protocol):
    """What :func:`generate` reports to (``streaming.ProgressReporter`` in the deployment)."""

    def report(self, stage: str, step: int, total: int, part: int | None = None,
               parts: int | None = None) -> None: ...

    def artifact(self, name: str, media_type: str, data: bytes,
                 meta: dict | None = None) -> None: ...

    def check_cancelled(self) -> None: ...


# ---- the tiny profile ---------------------------------------------------------------------------

def _build_tiny_pipeline(seed: int) -> Any:
    import torch
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    torch.manual_seed(seed)
    parts = {name: instantiate_from_config(TINY_CONFIG[name])
             for name in ("model", "vae", "conditioner", "scheduler", "image_processor")}
    for name in ("model", "vae", "conditioner"):
        parts[name].half().float()  # as saved: the calibration below sees the weights loaded
    return Hunyuan3DDiTFlowMatchingPipeline(**parts, device="cpu", dtype=torch.float32)


def _centre_field_on_zero(pipeline: Any, seed: int) -> None:
    """Shifts the geometry decoder's output so the decoded field's median over a few random
    inputs is 0, the real models' iso-level: a surface exists for (nearly) any input and seed."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    medians = []
    for i in range(4):
        rgba = np.zeros((96, 96, 4), np.uint8)
        rgba[16:80, 24:72, :3] = rng.integers(0, 256, (64, 48, 3))
        rgba[16:80, 24:72, 3] = 255
        latents = pipeline(image=Image.fromarray(rgba), num_inference_steps=4, octree_resolution=32,
                           generator=torch.Generator().manual_seed(i), output_type="latent",
                           enable_pbar=False)
        medians.append(float(decode_volume(pipeline, latents, 32, 8000, 0.0).median()))
    with torch.no_grad():
        pipeline.vae.geo_decoder.output_proj.bias -= float(np.median(medians))


def write_tiny_shape3d(out_dir: Path, seed: int = 0) -> Path:
    """Writes the tiny random Hunyuan3D (DiT, ShapeVAE, DINOv2 conditioner) in the official
    layout, ``<out_dir>/hunyuan3d-dit-tiny/{config.yaml, model.fp16.safetensors}``."""
    out_dir = Path(out_dir)
    pipeline = _build_tiny_pipeline(seed)
    _centre_field_on_zero(pipeline, seed)
    save_random_shape3d(pipeline, TINY_CONFIG, out_dir / TINY_SUBFOLDER)
    return out_dir


def save_random_shape3d(pipeline: Any, config: dict[str, Any], folder: Path) -> Path:
    """Saves a hy3dgen shape pipeline built from ``config`` with random weights in the official
    layout, ``<folder>/{config.yaml, model.fp16.safetensors}``, marked as untrained."""
    import safetensors.torch
    import yaml

    state = {f"{name}.{key}": value.half().contiguous().cpu()  # built on the GPU at full size
             for name in ("model", "vae", "conditioner")
             for key, value in getattr(pipeline, name).state_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(folder / CKPT_NAME))
    # config.yaml last: its presence marks a complete checkpoint
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, RANDOM_INIT_KEY: True}))
    return folder


def tiny_shape3d_dir(cache_dir: Path | None = None) -> Path:
    """The tiny checkpoint's directory (written once under the cache); load it with
    ``subfolder=TINY_SUBFOLDER``."""
    return tiny_dir(cache_dir, f"hunyuan3d/{TINY_DIR}", f"{TINY_SUBFOLDER}/config.yaml",
                    write_tiny_shape3d)


# ---- loading ------------------------------------------------------------------------------------

@dataclass
class ShapePipeline:
    """A loaded shape pipeline, its texturing, and where it came from."""

    pipeline: Any  # hy3dgen Hunyuan3DDiTFlowMatchingPipeline
    source: str  # hub id or absolute directory
    subfolder: str
    checkpoint: Path
    trained: bool
    device: str
    flashvdm: bool
    texture: Literal["paint", "project", "none"]
    texture_note: str = ""  # why painting is not used, where it is not
    painter: Any = None  # hy3dgen Hunyuan3DPaintPipeline when texture == "paint"
    _digest: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return self.subfolder if self.trained else TINY_DIR

    def weights_sha256(self) -> str:
        if not self._digest:
            self._digest = file_sha256(self.checkpoint)
        return self._digest


def paint_unavailable(device: str) -> str | None:
    """Why ``texture: auto`` projects instead of painting here, or ``None`` when it paints.
    Hunyuan3D-Paint runs on any device (``models/mesh/paint.py``, hy3dgen's pipeline with a torch
    rasterizer where the compiled one is missing); ``auto`` paints on CUDA."""
    if device != "cuda":
        return ("this server's mesh model runs on the CPU, and texture: auto paints on CUDA only "
                "(Hunyuan3D-Paint's multiview diffusion is slow on a CPU; texture: paint "
                "paints there all the same)")
    return None


def _source(model: str) -> str:
    # hy3dgen joins the path under $HY3DGEN_MODELS: an absolute path is used as it is.
    local = Path(model).expanduser()
    return str(local.resolve()) if local.is_dir() else model


def _load(source: str, subfolder: str, device: str, dtype: torch.dtype) -> tuple[Any, Path, bool]:
    import yaml
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen.models.autoencoders import MCSurfaceExtractor
    from hy3dgen.shapegen.utils import smart_load_model

    pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
        source, device=device, dtype=dtype, subfolder=subfolder, use_safetensors=True,
        variant="fp16")
    # 'dmc' needs diso and returns no mesh without it, silently: always marching cubes.
    pipeline.vae.surface_extractor = MCSurfaceExtractor()
    config_path, ckpt_path = smart_load_model(source, subfolder=subfolder, use_safetensors=True,
                                              variant="fp16")
    config = yaml.safe_load(Path(config_path).read_text())
    return pipeline, Path(ckpt_path), not config.get(RANDOM_INIT_KEY, False)


def _enable_flashvdm(pipeline: Any, source: str, subfolder: str, device: str,
                     dtype: torch.dtype) -> None:
    """hy3dgen's ``enable_flashvdm`` with what it gets wrong here: it reloads the turbo VAE by hub
    name only (never from a local directory) and in its default dtype (fp16, even on CPU)."""
    from hy3dgen.shapegen.models.autoencoders import ShapeVAE

    turbo = next((vae for dit, vae in TURBO_VAES.items() if subfolder.startswith(dit)), None)
    is_local = Path(source).is_dir()
    if turbo is not None and (not is_local or (Path(source) / turbo).is_dir()):
        try:
            pipeline.vae = ShapeVAE.from_pretrained(source, subfolder=turbo, device=device,
                                                    dtype=dtype, use_safetensors=True,
                                                    variant="fp16")
        except _LOAD_ERRORS as exc:
            logger.warning("FlashVDM: turbo VAE %s/%s unavailable (%s); the model's own VAE "
                           "decodes", source, turbo, str(exc).splitlines()[0])
    pipeline.vae.enable_flashvdm_decoder(enabled=True, adaptive_kv_selection=True,
                                         topk_mode="mean", mc_algo="mc")


def _load_painter(settings: MeshSettings, mode: ModelsMode, device: str,
                  cache_dir: Path | None) -> tuple[Any, Literal["paint", "project", "none"], str]:
    if settings.texture in ("project", "none"):
        return None, settings.texture, ""
    trained = mode != "tiny"
    reason = None if settings.texture == "paint" else paint_unavailable(device)
    if reason is None:
        # hy3dgen.texgen and the diffusers pipelines load here, only where texturing paints
        from atelier3d.models.mesh import paint

        try:
            if trained:
                painter = paint.load_paint_pipeline(_source(settings.paint_model), device)
            else:
                painter = paint.load_paint_pipeline(
                    str(paint.tiny_paint_dir(cache_dir)), device,
                    render_size=paint.TINY_RENDER_SIZE, texture_size=paint.TINY_RENDER_SIZE)
            return painter, "paint", ""
        except _LOAD_ERRORS as exc:
            reason = f"paint weights {settings.paint_model!r} unavailable ({exc})"
    if settings.texture == "paint":
        raise RuntimeError(f"texture: paint was configured, but {reason}")
    logger.warning("Shape3D texture: %s; vertex colours are projected from the input view",
                   reason)
    return None, "project", reason


def load_shape_pipeline(settings: MeshSettings, mode: ModelsMode = "auto",
                        cache_dir: Path | None = None) -> ShapePipeline:
    """Loads the shape pipeline (and the paint pipeline, where texturing paints).

    ``mode="tiny"`` loads the tiny random model; ``"real"`` fails when the named weights cannot
    be had; ``"auto"`` falls back to tiny with a loud warning. Device and dtype are passed
    explicitly (hy3dgen's defaults are cuda and fp16).
    """
    device = resolve_device(settings.device, "mesh.device")
    dtype = resolve_dtype(settings.dtype, device, on_cuda="float16")

    def load_named() -> tuple[str, str, Any, Path, bool]:
        source, subfolder = _source(settings.model), settings.subfolder
        return source, subfolder, *_load(source, subfolder, device, dtype)

    def load_tiny() -> tuple[str, str, Any, Path, bool]:
        source, subfolder = str(tiny_shape3d_dir(cache_dir)), TINY_SUBFOLDER
        return source, subfolder, *_load(source, subfolder, device, dtype)

    source, subfolder, pipeline, checkpoint, trained = load_or_tiny(
        mode, load_named, load_tiny, errors=_LOAD_ERRORS,
        weights=f"Hunyuan3D weights {settings.model!r}/{settings.subfolder}",
        consequence="meshes will be meaningless")
    if settings.flashvdm:
        _enable_flashvdm(pipeline, source, subfolder, device, dtype)
    painter, texture, note = _load_painter(settings, mode if trained else "tiny", device,
                                           cache_dir)
    return ShapePipeline(pipeline=pipeline, source=source, subfolder=subfolder,
                         checkpoint=checkpoint, trained=trained, device=device,
                         flashvdm=settings.flashvdm, texture=texture, texture_note=note,
                         painter=painter)


# ---- the pipeline's stages ----------------------------------------------------------------------

def diffuse(pipeline: Any, rgba: np.ndarray, seed: int, steps: int, guidance_scale: float,
            on_conditioned: Callable[[], None] = lambda: None,
            on_step: Callable[[int], None] = lambda step: None) -> torch.Tensor:
    """Conditioning and the diffusion loop: ``pipeline.__call__`` up to the latents.
    ``on_conditioned()`` runs when the conditioner has run, ``on_step(i)`` after step ``i``
    (from 1); either may raise to stop the call."""
    import torch
    from PIL import Image

    hook = pipeline.conditioner.register_forward_hook(lambda *_: on_conditioned())
    try:
        return pipeline(image=Image.fromarray(np.ascontiguousarray(rgba)),
                        num_inference_steps=steps, guidance_scale=guidance_scale,
                        generator=torch.Generator().manual_seed(seed), output_type="latent",
                        enable_pbar=False, callback=lambda i, _t, _out: on_step(i + 1),
                        callback_steps=1)
    finally:
        hook.remove()


def volume_chunks(pipeline: Any, octree_resolution: int, num_chunks: int) -> int | None:
    """How many batches of query points the volume decoder runs: known for hy3dgen's dense
    decoder, which queries every point of the (octree + 1)^3 grid; ``None`` for the
    hierarchical ones (FlashVDM), whose later levels query only near the surface."""
    from hy3dgen.shapegen.models.autoencoders.volume_decoders import VanillaVolumeDecoder

    if not isinstance(pipeline.vae.volume_decoder, VanillaVolumeDecoder):
        return None
    return -(-(octree_resolution + 1) ** 3 // num_chunks)


def decode_volume(pipeline: Any, latents: torch.Tensor, octree_resolution: int, num_chunks: int,
                  mc_level: float, before_chunk: Callable[[int], None] = lambda index: None
                  ) -> torch.Tensor:
    """The VAE and its volume decoder, as ``_export`` and ``latents2mesh`` chain them.
    ``before_chunk(i)`` runs before the ``i``-th batch of query points (from 0): a chance to
    report and to stop."""
    import torch

    vae = pipeline.vae
    calls = itertools.count()
    hook = vae.geo_decoder.register_forward_pre_hook(lambda *_: before_chunk(next(calls)))
    try:
        with torch.inference_mode():
            decoded = vae(1.0 / vae.scale_factor * latents)
            return vae.volume_decoder(decoded, vae.geo_decoder, bounds=BOX_V, mc_level=mc_level,
                                      num_chunks=num_chunks, octree_resolution=octree_resolution,
                                      enable_pbar=False)
    finally:
        hook.remove()


def extract_surface(pipeline: Any, grid: torch.Tensor, octree_resolution: int,
                    mc_level: float, on_step: Callable[[int], None] = lambda step: None
                    ) -> trimesh.Trimesh:
    """Marching cubes on the decoded volume, then hy3dgen's export to trimesh; ``on_step(i)``
    after each of the two (``SURFACE_STEPS``)."""
    import torch
    from hy3dgen.shapegen.pipelines import export_to_trimesh

    finite = grid[torch.isfinite(grid)]  # FlashVDM leaves cells it skipped as NaN
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
    if not low <= mc_level <= high:
        raise Unprocessable(f"no surface: the decoded field spans [{low:.3g}, {high:.3g}], "
                            f"the iso-level is {mc_level}; try another seed or image")
    outputs = pipeline.vae.surface_extractor(grid, bounds=BOX_V, mc_level=mc_level,
                                             octree_resolution=octree_resolution)
    on_step(1)
    mesh = export_to_trimesh(outputs)[0]
    if mesh is None or len(mesh.faces) == 0:
        raise Unprocessable("marching cubes found no surface; try another seed or image")
    on_step(2)
    return mesh


def postprocess(mesh: trimesh.Trimesh, max_faces: int, method: PostprocessMethod,
                on_step: Callable[[int, int], None] = lambda step, steps: None
                ) -> trimesh.Trimesh:
    """Floaters and degenerate faces removed, reduced to ``max_faces``: by
    ``atelier3d.optimizations.mesh_cleanup`` (``fast``) or by hy3dgen's pymeshlab filters
    (``pymeshlab``, the reference; ``benchmarks/mesh_postprocess.py`` compares the two).
    ``on_step(i, n)`` after each of its ``n`` steps."""
    if method == "pymeshlab":
        return postprocess_pymeshlab(mesh, max_faces, on_step)
    from atelier3d.optimizations.mesh_cleanup import clean_up

    return clean_up(mesh, max_faces, on_step=on_step)


def postprocess_pymeshlab(mesh: trimesh.Trimesh, max_faces: int,
                          on_step: Callable[[int, int], None] = lambda step, steps: None
                          ) -> trimesh.Trimesh:
    """hy3dgen's FloaterRemover, DegenerateFaceRemover and FaceReducer, as its API server chains
    them, without their temporary files: those classes convert through ``.ply`` files they never
    delete. Here the same pymeshlab filters (hy3dgen's ``remove_floater`` and ``reduce_face``) run
    on an in-memory MeshSet, and each trimesh is built with trimesh's processing, which is what
    the ``.ply`` round trips (the whole of the degenerate-face step) amount to."""
    import pymeshlab
    import trimesh
    from hy3dgen.shapegen.postprocessors import reduce_face, remove_floater

    def meshset(m: trimesh.Trimesh) -> pymeshlab.MeshSet:
        ms = pymeshlab.MeshSet()
        ms.add_mesh(pymeshlab.Mesh(vertex_matrix=np.asarray(m.vertices, np.float64),
                                   face_matrix=np.asarray(m.faces, np.int32)))
        return ms

    def back(ms: pymeshlab.MeshSet) -> trimesh.Trimesh:
        return trimesh.Trimesh(ms.current_mesh().vertex_matrix(), ms.current_mesh().face_matrix())

    cleaned = back(remove_floater(meshset(mesh)))
    on_step(1, 2)
    reduced = back(reduce_face(meshset(cleaned), max_faces))
    on_step(2, 2)
    return reduced


# ---- colours, frames, GLB -----------------------------------------------------------------------

def project_colors(vertices: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """``(N, 4)`` uint8 vertex colours from the input view: an orthographic projection along z,
    the mesh's x/y extent mapped onto the cut-out's box. Vertices facing the camera take the
    colour they are seen with; the back takes the mirror image of the front (the same
    projection), and what falls outside the silhouette the nearest cut-out colour."""
    from scipy import ndimage

    x0, y0, x1, y1 = alpha_box(rgba)
    crop = rgba[y0:y1, x0:x1]
    nearest = ndimage.distance_transform_edt(crop[..., 3] == 0, return_distances=False,
                                             return_indices=True)
    filled = crop[..., :3][nearest[0], nearest[1]]
    low, high = vertices[:, :2].min(axis=0), vertices[:, :2].max(axis=0)
    span = np.maximum(high - low, 1e-9)
    cols = np.rint((vertices[:, 0] - low[0]) / span[0] * (x1 - x0 - 1)).astype(np.intp)
    rows = np.rint((high[1] - vertices[:, 1]) / span[1] * (y1 - y0 - 1)).astype(np.intp)
    colors = filled[rows, cols]
    return np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)


def image_frame(mesh: trimesh.Trimesh, box: tuple[int, int, int, int],
                frame: tuple[int, int, int, int]) -> np.ndarray:
    """4x4 transform putting a part's normalised mesh where its cut-out ``box`` lies in the image:
    ``frame`` (the union of all parts' boxes) spans [-1, 1] on its longer side, y up; the mesh's
    x/y extent is scaled onto its box, its depth by the mean of both scales, centred on z=0."""
    fx0, fy0, fx1, fy1 = frame
    scale = 2.0 / max(fx1 - fx0, fy1 - fy0)
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    x0, y0, x1, y1 = box
    low, high = mesh.bounds
    size = np.maximum(high - low, 1e-9)
    sx, sy = (x1 - x0) * scale / size[0], (y1 - y0) * scale / size[1]
    sz = (sx + sy) / 2
    matrix = np.diag([sx, sy, sz, 1.0])
    matrix[:3, 3] = [(x0 - cx) * scale - low[0] * sx, (cy - y1) * scale - low[1] * sy,
                     -(low[2] + high[2]) / 2 * sz]
    return matrix


def to_glb(meshes: list[tuple[str, trimesh.Trimesh]]) -> bytes:
    """One GLB, one scene node (and geometry) per named mesh."""
    import trimesh

    scene = trimesh.Scene()
    for name, mesh in meshes:
        scene.add_geometry(mesh, node_name=name, geom_name=name)
    return scene.export(file_type="glb")


# ---- one job ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    seed: int
    steps: int
    guidance_scale: float
    octree_resolution: int
    num_chunks: int
    target_face_count: int
    mc_level: float
    postprocess: PostprocessMethod


def resolve_params(request: MeshRequest, settings: MeshSettings) -> Params:
    """The request's parameters, the server's defaults where it gives none."""
    def pick(name: str) -> Any:
        value = getattr(request, name)
        return getattr(settings, name) if value is None else value

    params = Params(seed=request.seed, mc_level=settings.mc_level,
                    postprocess=settings.postprocess,
                    **{name: pick(name) for name in ("steps", "guidance_scale",
                                                     "octree_resolution", "num_chunks",
                                                     "target_face_count")})
    if params.octree_resolution > settings.max_octree_resolution:
        raise Unprocessable(f"octree_resolution {params.octree_resolution} is above this "
                            f"server's limit, {settings.max_octree_resolution}")
    return params


class _Stages:
    """Reports each stage's progress over all parts and adds up each stage's time. A stage of
    ``n`` steps on part ``k`` of ``parts`` reports step ``k * n + i`` of ``parts * n`` (so the
    fraction of the stage over the whole asset), naming the part where there are several. On
    CUDA the clock waits for the GPU at each stage's end, so queued kernels count for the stage
    that queued them."""

    def __init__(self, reporter: Reporter, parts: int, steps: int, device: str) -> None:
        import torch

        self.reporter, self.parts, self.steps = reporter, parts, steps
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.timings_ms = dict.fromkeys(STAGES, 0.0)
        self._since = perf_counter()

    def step(self, stage: str, part: int, step: int, steps: int) -> None:
        """Step ``step`` (from 1) of the ``steps`` of ``stage`` on ``part`` is done; the stage's
        time is counted at its last step."""
        if step == steps:
            self.sync()
            now = perf_counter()
            self.timings_ms[stage] += (now - self._since) * 1000
            self._since = now
        done, total = part * steps + step, self.parts * steps
        if self.parts > 1:
            self.reporter.report(stage, done, total, part + 1, self.parts)
        else:
            self.reporter.report(stage, done, total)

    def done(self, stage: str, part: int) -> None:
        self.step(stage, part, 1, 1)

    def denoised(self, part: int, step: int) -> None:
        self.step("denoise", part, step, self.steps)

    def decoding(self, part: int, chunks: int | None) -> tuple[Callable[[int], None], int]:
        """``decode_volume``'s ``before_chunk`` and the stage's steps: a cancel check before
        each batch of query points, and up to ``VOLUME_STEPS`` reports spread over the
        ``chunks`` batches (where the decoder's count is unknown, a step per batch up to the
        last but one). The caller reports the last step when the volume is decoded."""
        steps = min(VOLUME_STEPS, chunks) if chunks else VOLUME_STEPS

        def before_chunk(index: int) -> None:
            self.reporter.check_cancelled()
            if chunks:  # batch ``index`` starts: ``index`` of ``chunks`` are done
                reached = index * steps // chunks
                if reached and reached != (index - 1) * steps // chunks:
                    self.step("volume_decode", part, reached, steps)
            elif 0 < index < steps:
                self.step("volume_decode", part, index, steps)

        return before_chunk, steps


def _surface(model: ShapePipeline, rgba: np.ndarray, params: Params, stages: _Stages,
             part: int) -> trimesh.Trimesh:
    pipeline = model.pipeline
    latents = diffuse(pipeline, rgba, params.seed, params.steps, params.guidance_scale,
                      on_conditioned=lambda: stages.done("conditioning", part),
                      on_step=lambda step: stages.denoised(part, step))
    before_chunk, volume_steps = stages.decoding(
        part, volume_chunks(pipeline, params.octree_resolution, params.num_chunks))
    grid = decode_volume(pipeline, latents, params.octree_resolution, params.num_chunks,
                         params.mc_level, before_chunk=before_chunk)
    stages.step("volume_decode", part, volume_steps, volume_steps)
    mesh = extract_surface(
        pipeline, grid, params.octree_resolution, params.mc_level,
        on_step=lambda step: stages.step("mesh_extraction", part, step, SURFACE_STEPS))
    del grid  # up to (octree + 1)^3 floats
    return mesh


def paint_texture(model: ShapePipeline, mesh: trimesh.Trimesh, rgba: np.ndarray,
                  on_step: Callable[[int, int], None] = lambda step, steps: None
                  ) -> trimesh.Trimesh:
    """``mesh`` painted by ``model``'s paint pipeline from the cut-out's box of ``rgba``;
    ``on_step(i, n)`` after each of its ``n`` phases (``paint.PaintPipeline``)."""
    from PIL import Image

    x0, y0, x1, y1 = alpha_box(rgba)
    return model.painter(mesh, image=Image.fromarray(np.ascontiguousarray(rgba[y0:y1, x0:x1])),
                         on_phase=on_step)


def project_texture(mesh: trimesh.Trimesh, rgba: np.ndarray) -> trimesh.Trimesh:
    """A copy of ``mesh`` with vertex colours projected from the input view."""
    import trimesh

    colored = mesh.copy()
    colored.visual = trimesh.visual.ColorVisuals(
        colored, vertex_colors=project_colors(colored.vertices, rgba))
    return colored


@dataclass
class Surfaces:
    """What a job's first half hands its second: each part's marching-cubes surface as arrays
    (through Ray's object store they are read in place, not copied or encoded), its cut-out, and
    what the second half needs to finish the job as one process would."""

    names: list[str]
    images: list[np.ndarray]  # (H, W, 4) uint8 cut-outs
    vertices: list[np.ndarray]  # (N, 3) float
    faces: list[np.ndarray]  # (M, 3) int
    layered: bool
    params: Params
    texture: Literal["paint", "project", "none"]  # what this job's texturing is
    texture_note: str  # why it projects rather than paints, where it does
    trained: bool
    timings_ms: dict[str, float]  # the first half's stages


def extract_surfaces(model: ShapePipeline, request: MeshRequest, reporter: Reporter,
                     settings: MeshSettings) -> Surfaces:
    """A job's first half, on the model's device: per part, conditioning, denoising (every
    step reported), volume decoding and surface extraction. Calls on one pipeline must not
    overlap (hy3dgen keeps the scheduler's state on it)."""
    params = resolve_params(request, settings)
    named = request.named_images()
    stages = _Stages(reporter, len(named), params.steps, model.device)
    meshes = [_surface(model, rgba, params, stages, k) for k, (_, rgba) in enumerate(named)]
    return Surfaces(
        names=[name for name, _ in named], images=[rgba for _, rgba in named],
        vertices=[np.asarray(m.vertices) for m in meshes],
        faces=[np.asarray(m.faces) for m in meshes], layered=request.parts is not None,
        params=params, texture=model.texture if request.texture else "none",
        texture_note=model.texture_note, trained=model.trained, timings_ms=dict(stages.timings_ms))


def finish(surfaces: Surfaces, reporter: Reporter, painter: ShapePipeline | None = None) -> dict:
    """A job's second half, on the CPU: each part post-processed, the untextured GLB as the
    ``shape`` artifact as soon as it exists, then textured (vertex colours projected from the
    view; painted by ``painter``'s paint pipeline where the job paints) unless it has none.
    Progress: ``postprocess`` (the clean-up's steps) per part, then ``texture`` (painting's
    phases, or one step) per part. Returns the result event's fields."""
    import trimesh

    if surfaces.texture == "paint" and painter is None:
        raise ValueError("a painted job finishes where its paint pipeline is")
    params, names = surfaces.params, surfaces.names
    stages = _Stages(reporter, len(names), params.steps, "cpu")
    stages.timings_ms.update(surfaces.timings_ms)
    shapes = []
    for k, (vertices, faces) in enumerate(zip(surfaces.vertices, surfaces.faces, strict=True)):
        # copies: arrays read from the object store are read-only
        surface = trimesh.Trimesh(np.array(vertices), np.array(faces), process=False)
        shapes.append(postprocess(
            surface, params.target_face_count, params.postprocess,
            on_step=lambda step, steps, k=k: stages.step("postprocess", k, step, steps)))

    if surfaces.layered:  # one frame for all parts, as they lie in the image
        boxes = [alpha_box(rgba) for rgba in surfaces.images]
        frame = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                 max(b[2] for b in boxes), max(b[3] for b in boxes))
        placements = [image_frame(mesh, box, frame) for mesh, box in zip(shapes, boxes,
                                                                         strict=True)]
    else:
        placements = [np.eye(4)]

    def placed(meshes: list[trimesh.Trimesh]) -> list[tuple[str, trimesh.Trimesh]]:
        return [(name, mesh.copy().apply_transform(matrix))
                for name, mesh, matrix in zip(names, meshes, placements, strict=True)]

    counts = [{"name": name, "vertices": len(m.vertices), "faces": len(m.faces)}
              for name, m in zip(names, shapes, strict=True)]
    meta: dict[str, Any] = {
        "vertices": sum(c["vertices"] for c in counts), "faces": sum(c["faces"] for c in counts),
        "seed": params.seed, "steps": params.steps, "octree_resolution": params.octree_resolution,
        "weights": "trained" if surfaces.trained else "untrained",
    }
    if surfaces.layered:
        meta["parts"] = counts
    reporter.artifact("shape", GLB, to_glb(placed(shapes)),
                      {**meta, "texture": "none", "timings_ms": dict(stages.timings_ms)})

    final = shapes
    if surfaces.texture != "none":
        final = []
        for k, (rgba, mesh) in enumerate(zip(surfaces.images, shapes, strict=True)):
            def on_step(step: int, steps: int, k: int = k) -> None:
                stages.step("texture", k, step, steps)

            if surfaces.texture == "paint":
                final.append(paint_texture(painter, mesh, rgba, on_step))
            else:
                final.append(project_texture(mesh, rgba))
                on_step(1, 1)
    timings = {stage: round(ms, 1) for stage, ms in stages.timings_ms.items()}
    if surfaces.texture == "project" and surfaces.texture_note:
        meta["texture_note"] = surfaces.texture_note
    return {"media_type": GLB, "data": to_glb(placed(final)),
            "meta": {**meta, "texture": surfaces.texture, "timings_ms": timings}}


def generate(model: ShapePipeline, request: MeshRequest, reporter: Reporter,
             settings: MeshSettings) -> dict:
    """One job in this process: :func:`extract_surfaces`, then :func:`finish`. Progress:
    ``conditioning``, ``denoise`` (every step), ``volume_decode`` (``VOLUME_STEPS`` over its
    batches of query points), ``mesh_extraction`` (``SURFACE_STEPS``) per part, then
    ``postprocess`` per part, then ``texture`` per part; a layered asset's reports name the
    part."""
    return finish(extract_surfaces(model, request, reporter, settings), reporter, model)
