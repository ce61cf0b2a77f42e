"""Hunyuan3D-2 at full size on a GPU: seconds per stage and peak memory, with random weights.

For a lent GPU with no network: the Hunyuan3D-2mini (0.6 B DiT) and Hunyuan3D-2 v2-0 (1.1 B DiT)
architectures are built from their published ``config.yaml`` (written out below) with hy3dgen's
own ``instantiate_from_config``, directly on the GPU in fp16, with random weights, and run through
``atelier3d.models.mesh.hunyuan3d.generate`` (the Shape3D deployment's code) at octree 256, with the
dense volume decoder and with FlashVDM's. Stage clocks wait for the GPU at each stage's end.

Random weights decode a noisy field, not a shape; so that marching cubes, post-processing and
FlashVDM's near-surface refinement see something like a trained model's field, the geometry
decoder's output is rescaled once per model: the iso-level 0 sits at the 99th percentile of a
coarse decode, and the field is steep around it (|logit| < 0.95 only near the surface, as
FlashVDM assumes). The DiT, conditioner and VAE costs are the real architectures' costs.

Run: ``python benchmarks/gpu/mesh_gpu.py`` (prints a table; JSON to ``$OUT/mesh_gpu.json`` when
``$OUT`` is set); ``--dry-run``: the tiny model on CPU at octree 64, to check the script here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from atelier3d.config import MeshSettings  # noqa: E402
from atelier3d.models.mesh import hunyuan3d as H  # noqa: E402
from atelier3d.stages.mesh import MeshRequest  # noqa: E402

# DINOv2-giant, the image encoder of both (facebook/dinov2-giant's config).
DINO_GIANT = dict(model_type="dinov2", hidden_size=1536, num_hidden_layers=40,
                  num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True, patch_size=14,
                  image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
                  qkv_bias=True, drop_path_rate=0.0)


def published_config(depth: int, single: int, latents: int, scale_factor: float) -> dict:
    """tencent/Hunyuan3D-2{,mini}/hunyuan3d-dit-v2-{0,mini}/config.yaml, DINO config inline."""
    return {
        "model": {"target": "hy3dgen.shapegen.models.Hunyuan3DDiT", "params": dict(
            in_channels=64, context_in_dim=1536, hidden_size=1024, mlp_ratio=4.0, num_heads=16,
            depth=depth, depth_single_blocks=single, axes_dim=[64], theta=10000, qkv_bias=True,
            guidance_embed=False)},
        "vae": {"target": "hy3dgen.shapegen.models.ShapeVAE", "params": dict(
            num_latents=latents, embed_dim=64, num_freqs=8, include_pi=False, heads=16,
            width=1024, num_decoder_layers=16, qkv_bias=False, qk_norm=True,
            scale_factor=scale_factor)},
        "conditioner": {"target": "hy3dgen.shapegen.models.SingleImageEncoder", "params": {
            "main_image_encoder": {"type": "DinoImageEncoder", "kwargs": {
                "config": DINO_GIANT, "image_size": 518, "use_cls_token": True}}}},
        "scheduler": {"target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
                      "params": {"num_train_timesteps": 1000}},
        "image_processor": {"target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
                            "params": {"size": 512, "border_ratio": 0.15}},
    }


ARCHS = {
    "hunyuan3d-dit-v2-mini": published_config(8, 16, 512, 1.0188137142395404),
    "hunyuan3d-dit-v2-0": published_config(16, 32, 3072, 0.9990943042622529),
}


def build(config: dict, device: str, dtype) -> H.ShapePipeline:
    import torch
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen.models.autoencoders import MCSurfaceExtractor
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    torch.manual_seed(0)
    with torch.device(device):  # parameters created where they run: no CPU init of 2.4 B
        parts = {name: instantiate_from_config(copy.deepcopy(config[name]))
                 for name in ("model", "vae", "conditioner", "scheduler", "image_processor")}
    pipeline = Hunyuan3DDiTFlowMatchingPipeline(**parts, device=device, dtype=dtype)
    pipeline.vae.surface_extractor = MCSurfaceExtractor()
    return H.ShapePipeline(pipeline=pipeline, source="random", subfolder="random",
                           checkpoint=Path(os.devnull), trained=False, device=device,
                           flashvdm=False, texture="project")


def shape_the_field(model: H.ShapePipeline, image: np.ndarray) -> None:
    """Rescales the geometry decoder's output (see the module's docstring)."""
    import torch

    pipeline = model.pipeline
    latents = H.diffuse(pipeline, image, seed=0, steps=2, guidance_scale=5.0)
    grid = H.decode_volume(pipeline, latents, 64, 100_000, 0.0).float().flatten()
    level, spread = float(torch.quantile(grid[::7], 0.99)), float(grid.std())
    proj = pipeline.vae.geo_decoder.output_proj
    with torch.no_grad():
        gain = 10.0 / max(spread, 1e-6)
        proj.weight.mul_(gain)
        proj.bias.sub_(level).mul_(gain)


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


class Silent:
    def report(self, stage: str, step: int, total: int, part: int | None = None,
               parts: int | None = None) -> None: ...

    def artifact(self, name: str, media_type: str, data: bytes, meta: dict | None = None) -> None:
        ...

    def check_cancelled(self) -> None: ...


def run_once(model: H.ShapePipeline, image: np.ndarray, settings: MeshSettings, steps: int,
             octree: int) -> dict:
    import torch

    if model.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = H.generate(model, MeshRequest.build(image=image, steps=steps,
                                              octree_resolution=octree), Silent(), settings)
    return {"total_s": round(time.perf_counter() - start, 3),
            "stages_s": {k: round(v / 1000, 3) for k, v in out["meta"]["timings_ms"].items()},
            "faces": out["meta"]["faces"], "peak_gib": peak_gib(model.device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model, CPU, octree 64")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--octree", type=int, default=256)
    parser.add_argument("--num-chunks", type=int, default=200_000,
                        help="query points per decoding batch (hy3dgen's Gradio app: 200000)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip what would start after this many seconds")
    args = parser.parse_args()

    import torch

    from atelier3d.samples import drawn_character, drawn_character_labels

    began = time.perf_counter()
    image = np.dstack([drawn_character(), (drawn_character_labels() > 0).astype(np.uint8) * 255])
    if args.dry_run:
        device, dtype, steps, octree = "cpu", torch.float32, 2, 64
        archs = {"tiny": H.TINY_CONFIG}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --dry-run on CPU", file=sys.stderr)
            return 2
        device, dtype, steps, octree = "cuda", torch.float16, args.steps, args.octree
        archs = {name: ARCHS[name] for name in args.archs}
    settings = MeshSettings(num_chunks=args.num_chunks, device=device)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "steps": steps, "octree": octree,
                    "num_chunks": args.num_chunks, "runs": {}}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    for name, config in archs.items():
        if time.perf_counter() - began > args.budget_s:
            print(f"skipping {name}: past the {args.budget_s:.0f} s budget")
            continue
        t = time.perf_counter()
        model = build(config, device, dtype)
        params = {part: sum(p.numel() for p in getattr(model.pipeline, part).parameters())
                  for part in ("model", "vae", "conditioner")}
        shape_the_field(model, image)
        built_s = time.perf_counter() - t
        for flashvdm in (False, True):
            vae = model.pipeline.vae
            vae.enable_flashvdm_decoder(enabled=flashvdm, adaptive_kv_selection=True,
                                        topk_mode="mean", mc_algo="mc")
            run_once(model, image, settings, 2, min(octree, 128))  # warm-up: kernels, allocator
            result = run_once(model, image, settings, steps, octree)
            key = f"{name}{'+flashvdm' if flashvdm else ''}"
            report["runs"][key] = {"params_m": {k: round(v / 1e6, 1) for k, v in params.items()},
                                   "build_s": round(built_s, 1), **result}
            print(f"{key:34s} total {result['total_s']:7.2f} s  " + "  ".join(
                f"{k} {v:.2f}" for k, v in result["stages_s"].items())
                + f"  faces {result['faces']}  peak {result['peak_gib'] or 0:.1f} GiB", flush=True)
            if out_dir is not None:  # after each run: a cut-short session keeps what it had
                (out_dir / "mesh_gpu.json").write_text(json.dumps(report, indent=2))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
