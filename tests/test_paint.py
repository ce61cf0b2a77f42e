"""Hunyuan3D-Paint from this project's install: tiny random weights in the official
``hunyuan3d-paint-v2-0`` / ``hunyuan3d-delight-v2-0`` layouts, loaded by hy3dgen's own loaders,
and hy3dgen's ``Hunyuan3DPaintPipeline.__call__`` run end to end on the CPU, inside the Shape3D
deployment's class and directly."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import trimesh
from PIL import Image

from atelier3d.models.mesh import paint
from atelier3d.stages.mesh import MeshRequest, alpha_box
from tests.helpers import GENERATED, cutout


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
