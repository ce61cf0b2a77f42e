"""Hunyuan3D-Paint from this project's install: tiny random weights in the official
``hunyuan3d-paint-v2-0`` / ``hunyuan3d-delight-v2-0`` layouts, loaded by hy3dgen's own loaders,
and hy3dgen's ``Hunyuan3DPaintPipeline.__call__`` run end to end on the CPU, inside the Shape3D
deployment's class, served (real Ray Serve, real HTTP) and directly.

The served case needs a server whose Shape3D paints (``mesh.texture: paint``), which the
session's ``server`` is not (on the CPU ``auto`` projects): it runs in a subprocess with a Ray
of its own (this module run as a script), which writes the GLBs it was served to a directory
and prints what else it saw as one JSON line.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from atelier3d.models.mesh import paint
from atelier3d.stages.mesh import MeshRequest, alpha_box
from tests.helpers import CUTOUT, GENERATED, cutout, free_port, png_bytes, print_report, run_driver

REPORT = "PAINT-REPORT "
SERVED = {"seed": 3, "steps": 2, "octree_resolution": 64, "target_face_count": 500}


@pytest.fixture(scope="module")
def tiny_paint():
    return paint.tiny_paint_dir(GENERATED)


def test_tiny_paint_weights_are_in_the_official_layouts(tiny_paint):
    multiview = tiny_paint / paint.PAINT_SUBFOLDER
    delight = tiny_paint / paint.DELIGHT_SUBFOLDER
    index = json.loads((multiview / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanPaintPipeline"
    assert index["unet"] == ["modules", "UNet2p5DConditionModel"]
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/modules.py",
                 "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                 "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"):
        assert (multiview / name).is_file(), name
    index = json.loads((delight / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    assert paint.is_random_init(str(tiny_paint))


def test_shape3d_paints_and_its_glb_equals_the_paint_pipeline_called_directly(tiny_paint):
    """The Shape3D deployment's class in-process with ``texture: paint`` on the CPU and the tiny
    weights: its textured GLB is the shape it streamed, painted by hy3dgen's pipeline called
    directly on the same cut-out, byte for byte; it names the texturing that runs."""
    from atelier3d.deployments.mesh import Shape3D

    shape3d = Shape3D.func_or_class({"models": "tiny", "cache_dir": str(GENERATED),
                                     "mesh": {"texture": "paint"}})
    assert shape3d.model.texture == "paint" and shape3d.model.texture_note == ""
    assert shape3d.info().model_type.endswith("+texture=paint")
    image = cutout()
    loop = asyncio.new_event_loop()
    try:
        events = loop.run_until_complete(_collect(shape3d, MeshRequest.build(
            image=image, seed=3, steps=2, octree_resolution=64, target_face_count=500)))
    finally:
        loop.close()
    shape_event = next(e for e in events if e.get("name") == "shape")
    result = events[-1]
    assert result["type"] == "result" and result["meta"]["texture"] == "paint"
    assert "texture_note" not in result["meta"]
    # painting reports its phases (delight + unwrap, renders, multiview, bake, inpaint)
    phases = [(e["step"], e["total"]) for e in events if e.get("stage") == "texture"]
    assert phases == [(i, paint.PAINT_PHASES) for i in range(1, paint.PAINT_PHASES + 1)]

    shape = _only_mesh(shape_event["data"])
    x0, y0, x1, y1 = alpha_box(image)
    untextured = trimesh.Trimesh(shape.vertices, shape.faces, process=False)
    # the GLB's float32 vertices are the replica's mesh exactly (test_mesh checks that)
    painted = shape3d.model.painter(untextured, image=Image.fromarray(
        np.ascontiguousarray(image[y0:y1, x0:x1])))
    textured = _only_mesh(result["data"])
    assert isinstance(textured.visual, trimesh.visual.TextureVisuals)
    np.testing.assert_array_equal(textured.faces, painted.faces)
    np.testing.assert_allclose(textured.visual.uv, painted.visual.uv, atol=1e-6)
    texture = np.asarray(textured.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(texture, np.asarray(painted.visual.material.image.convert("RGB")))
    # xatlas unwrapped it and the texture is the baked, inpainted map: random weights paint
    # noise, but paint (not a flat fill)
    uv = np.asarray(textured.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1 and texture.std() > 0


async def _collect(deployment, request: MeshRequest) -> list[dict]:
    return [event async for event in deployment.generate(request)]


def _only_mesh(data: bytes) -> trimesh.Trimesh:
    scene = trimesh.load(io.BytesIO(data), file_type="glb", force="scene", process=False)
    (mesh,) = scene.geometry.values()
    return mesh


# ---- served: real Ray Serve and HTTP, against hy3dgen's pipeline called directly ---------------

def main(cache_dir: str, out_dir: str) -> None:
    """The driver: the app with ``mesh.texture: paint`` (tiny weights, no UI) on a Ray of its
    own; one mesh job of ``CUTOUT`` over HTTP; its shape and result GLBs written to ``out_dir``.
    """
    from atelier3d.serve import runner

    port = free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": False, "mesh": {"texture": "paint"}})
    report: dict = {}
    try:
        runner.start(config, timeout_s=500)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            report["readyz"] = http.get("/readyz").json()
            submitted = http.post("/v1/jobs/mesh", files={"image": ("cut.png", png_bytes(CUTOUT))},
                                  data={"request": json.dumps(SERVED)})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["job_id"]
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                report["events"] = [json.loads(line) for line in response.iter_lines()
                                    if line.strip()]
            state = http.get(f"/v1/jobs/{job_id}").json()
            report["result_meta"] = state["result_meta"]
            out = Path(out_dir)
            out.joinpath("shape.glb").write_bytes(http.get(state["artifacts"][0]["url"]).content)
            out.joinpath("painted.glb").write_bytes(http.get(f"/v1/jobs/{job_id}/result").content)
    finally:
        print_report(REPORT, report)
        runner.stop()


@pytest.mark.cluster  # a Ray of its own, in a subprocess
def test_served_painted_glb_equals_the_paint_pipeline_called_directly(tiny_dir, tiny_paint,
                                                                       tmp_path):
    """``texture: paint`` served: Shape3D's ``/readyz`` says it paints, the job's events end
    with the painted GLB, and that GLB is hy3dgen's ``Hunyuan3DPaintPipeline.__call__`` on the
    served untextured shape and the cut-out's box, called here on the same tiny weights with
    the replica's one torch thread (so sums add up the same way), texel for texel."""
    report = run_driver("tests.test_paint", str(tiny_dir), str(tmp_path), marker=REPORT,
                        timeout_s=900)
    shape3d = report["readyz"]["models"]["shape3d"]
    assert shape3d["model_type"].endswith("+texture=paint"), shape3d
    events = report["events"]
    assert events[-1]["type"] == "succeeded", events[-1]
    kinds = [e.get("stage", e["type"]) for e in events]
    assert kinds.index("artifact") < kinds.index("texture") < kinds.index("succeeded")
    assert report["result_meta"]["texture"] == "paint"
    assert "texture_note" not in report["result_meta"]

    shape = _only_mesh((tmp_path / "shape.glb").read_bytes())
    x0, y0, x1, y1 = alpha_box(CUTOUT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline = paint.load_paint_pipeline(str(tiny_paint), "cpu",
                                             render_size=paint.TINY_RENDER_SIZE,
                                             texture_size=paint.TINY_RENDER_SIZE)
        painted = pipeline(trimesh.Trimesh(shape.vertices, shape.faces, process=False),
                           image=Image.fromarray(np.ascontiguousarray(CUTOUT[y0:y1, x0:x1])))
    finally:
        torch.set_num_threads(threads)
    served = _only_mesh((tmp_path / "painted.glb").read_bytes())
    assert isinstance(served.visual, trimesh.visual.TextureVisuals)
    np.testing.assert_array_equal(served.faces, painted.faces)
    np.testing.assert_allclose(served.vertices, painted.vertices, atol=1e-6)
    np.testing.assert_allclose(served.visual.uv, painted.visual.uv, atol=1e-6)
    texture = np.asarray(served.visual.material.baseColorTexture.convert("RGB"))
    assert texture.std() > 0  # painted noise (random weights), not a flat fill
    np.testing.assert_array_equal(
        texture, np.asarray(painted.visual.material.image.convert("RGB")))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
