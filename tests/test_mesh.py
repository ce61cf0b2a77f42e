"""Image-to-3D: the tiny Hunyuan3D checkpoint (official layout, loaded by hy3dgen), the Shape3D
deployment class in-process (events, equivalence with hy3dgen called directly, cancel,
serialisation, layered assets), request validation and mesh format conversion."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time

import numpy as np
import pytest
import safetensors.torch
import torch
import trimesh
from PIL import Image

from atelier3d.config import MeshSettings
from atelier3d.errors import BadRequest, Unprocessable
from atelier3d.models.mesh import hunyuan3d as H
from atelier3d.stages.mesh import FORMATS, GLB, MeshRequest, alpha_box, convert_mesh
from tests.helpers import CUTOUT as IMAGE
from tests.helpers import GENERATED, cutout

STEPS, OCTREE = 3, 64
FAST = dict(steps=STEPS, octree_resolution=OCTREE)
FACES = 1000  # below the tiny surface's face count at OCTREE: the clean-up decimates


@pytest.fixture(scope="module")
def loop():
    """One long-lived event loop, as a Serve replica has: a cancelled job's worker thread posts
    its last event to it after the stream has gone."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(H.tiny_shape3d_dir(GENERATED))


@pytest.fixture(scope="module")
def shape3d(tiny):
    """The Shape3D deployment's class in-process, with the tiny weights."""
    from atelier3d.deployments.mesh import Shape3D

    return Shape3D.func_or_class({"models": "tiny", "cache_dir": str(GENERATED)})


async def _collect(deployment, request: MeshRequest) -> list[dict]:
    return [event async for event in deployment.generate(request)]


def run(loop, deployment, **fields) -> list[dict]:
    return loop.run_until_complete(_collect(deployment, MeshRequest.build(**fields)))


def load_glb(data: bytes) -> trimesh.Scene:
    return trimesh.load(io.BytesIO(data), file_type="glb", force="scene", process=False)


def only_mesh(data: bytes) -> trimesh.Trimesh:
    (mesh,) = load_glb(data).geometry.values()
    return mesh


def test_tiny_checkpoint_is_the_official_layout(tiny):
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    folder = GENERATED / "hunyuan3d" / H.TINY_DIR / H.TINY_SUBFOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.fp16.safetensors"]
    state = safetensors.torch.load_file(folder / "model.fp16.safetensors")
    assert {key.split(".")[0] for key in state} == {"model", "vae", "conditioner"}
    assert all(v.dtype == torch.float16 for v in state.values())
    # hy3dgen's own loader, strict load_state_dict of every part
    pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
        tiny, subfolder=H.TINY_SUBFOLDER, device="cpu", dtype=torch.float32)
    assert pipeline.device.type == "cpu" and pipeline.dtype == torch.float32
    assert pipeline.vae.latent_shape == (64, 64)


def test_deployment_matches_hy3dgen_called_directly(loop, shape3d):
    events = run(loop, shape3d, image=IMAGE, seed=7, target_face_count=FACES, **FAST)

    stages = [(e["stage"], e["step"], e["total"]) for e in events if e["type"] == "progress"]
    # inside the long stages too: the volume decoder's 35 batches of 8000 query points (65^3
    # at octree 64) as 20 steps, marching cubes and the export, the clean-up's three steps
    volume = min(H.VOLUME_STEPS, -(-(OCTREE + 1) ** 3 // MeshSettings().num_chunks))
    assert volume == 20
    assert stages == [("conditioning", 1, 1), *[("denoise", i, STEPS) for i in (1, 2, 3)],
                      *[("volume_decode", i, volume) for i in range(1, volume + 1)],
                      ("mesh_extraction", 1, 2), ("mesh_extraction", 2, 2),
                      *[("postprocess", i, 3) for i in (1, 2, 3)], ("texture", 1, 1)]
    kinds = [e["type"] if e["type"] != "artifact" else e["name"] for e in events]
    last_postprocess = max(i for i, e in enumerate(events) if e.get("stage") == "postprocess")
    assert kinds.index("shape") == last_postprocess + 1  # right after the clean-up
    assert kinds[-1] == "result" and kinds.count("shape") == 1
    shape_event, result = events[kinds.index("shape")], events[-1]
    assert shape_event["media_type"] == result["media_type"] == GLB

    # the same call made directly on hy3dgen's pipeline, then the same post-processing
    settings = MeshSettings()
    direct = shape3d.model.pipeline(
        image=Image.fromarray(IMAGE), num_inference_steps=STEPS,
        guidance_scale=settings.guidance_scale, generator=torch.Generator().manual_seed(7),
        octree_resolution=OCTREE, num_chunks=settings.num_chunks, mc_level=settings.mc_level,
        output_type="trimesh", enable_pbar=False)[0]
    expected = H.postprocess(direct, FACES, settings.postprocess)
    # the default clean-up is the fast path, not pymeshlab's (both decimate to FACES here)
    assert settings.postprocess == "fast"
    assert not np.array_equal(H.postprocess_pymeshlab(direct, FACES).faces, expected.faces)

    shape = only_mesh(shape_event["data"])
    assert np.array_equal(shape.faces, expected.faces)
    np.testing.assert_array_equal(shape.vertices, expected.vertices.astype(np.float32))
    assert shape.visual.kind is None  # untextured

    textured = only_mesh(result["data"])
    assert np.array_equal(textured.faces, expected.faces)
    colors = textured.visual.vertex_colors
    assert textured.visual.kind == "vertex" and colors.shape == (len(textured.vertices), 4)
    # colours come from the cut-out: its two colours, nothing else
    assert {tuple(c) for c in colors[:, :3]} <= {(200, 60, 40), (40, 160, 220)}
    meta = result["meta"]
    assert meta["vertices"] == len(expected.vertices) and meta["faces"] == len(expected.faces)
    assert meta["texture"] == "project" and meta["weights"] == "untrained"
    assert set(meta["timings_ms"]) == set(H.STAGES)


def test_postprocess_is_hy3dgens_without_temp_files(shape3d, tmp_path, monkeypatch):
    from hy3dgen.shapegen import DegenerateFaceRemover, FaceReducer, FloaterRemover

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    raw = shape3d.model.pipeline(image=Image.fromarray(IMAGE), num_inference_steps=STEPS,
                                 generator=torch.Generator().manual_seed(1),
                                 octree_resolution=OCTREE, enable_pbar=False)[0]
    ours = H.postprocess_pymeshlab(raw.copy(), 2000)
    assert list(tmp_path.iterdir()) == []
    theirs = FaceReducer()(DegenerateFaceRemover()(FloaterRemover()(raw.copy())), max_facenum=2000)
    assert list(tmp_path.glob("*.ply"))  # the leak this avoids
    assert len(ours.faces) <= 2000
    assert np.array_equal(ours.faces, theirs.faces)
    assert np.array_equal(ours.vertices, theirs.vertices)


def test_texture_off_and_formats(loop, shape3d):
    events = run(loop, shape3d, image=IMAGE, texture=False, **FAST)
    assert "texture" not in {e.get("stage") for e in events}
    result = events[-1]
    assert result["meta"]["texture"] == "none"
    assert only_mesh(result["data"]).visual.kind is None

    colored = run(loop, shape3d, image=IMAGE, **FAST)[-1]["data"]
    faces = len(only_mesh(colored).faces)
    assert convert_mesh(colored, "glb") == colored
    for fmt in ("obj", "ply", "stl"):
        data = convert_mesh(colored, fmt)
        mesh = trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh", process=False)
        assert len(mesh.faces) == faces, fmt
        if fmt in ("obj", "ply"):
            assert mesh.visual.kind == "vertex", fmt
    assert set(FORMATS) == {"glb", "obj", "ply", "stl"}
    with pytest.raises(BadRequest):
        convert_mesh(colored, "fbx")


def test_cancel_stops_the_run_and_the_next_call_works(loop, shape3d):
    steps = 40
    forwards = []
    hook = shape3d.model.pipeline.model.register_forward_hook(lambda *_: forwards.append(1))

    async def cancel_at_step_2() -> list[dict]:
        seen, reached = [], asyncio.Event()

        async def consume() -> None:
            async for event in shape3d.generate(MeshRequest.build(image=IMAGE, steps=steps,
                                                                  octree_resolution=OCTREE)):
                seen.append(event)
                if event.get("stage") == "denoise" and event["step"] == 2:
                    reached.set()

        task = asyncio.create_task(consume())
        await reached.wait()
        task.cancel()  # as Serve does when the Gateway cancels the request
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return seen

    try:
        seen = loop.run_until_complete(cancel_at_step_2())
        assert shape3d._lock.acquire(timeout=30)  # the worker stopped and let go
        shape3d._lock.release()
    finally:
        hook.remove()
    assert all(e["type"] == "progress" for e in seen)
    assert len(forwards) < steps  # stopped within a step or two, not run to the end

    after = run(loop, shape3d, image=IMAGE, seed=3, **FAST)
    again = run(loop, shape3d, image=IMAGE, seed=3, **FAST)
    assert after[-1]["type"] == "result" and after[-1]["data"] == again[-1]["data"]


def test_concurrent_calls_are_serialised_and_both_right(loop, shape3d):
    alone = {seed: run(loop, shape3d, image=IMAGE, seed=seed, **FAST)[-1]["data"]
             for seed in (11, 12)}
    results, windows = {}, {}

    def call(seed: int) -> None:
        async def timed() -> None:
            times = []
            async for event in shape3d.generate(MeshRequest.build(image=IMAGE, seed=seed,
                                                                  **FAST)):
                times.append(time.perf_counter())
                results[seed] = event["data"] if event["type"] == "result" else None
            windows[seed] = (times[0], times[-1])

        asyncio.run(timed())

    threads = [threading.Thread(target=call, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == alone
    (a0, a1), (b0, b1) = sorted(windows.values())
    assert a1 <= b0  # one call's events all came before the other's first


def test_layered_asset_has_a_node_per_part_in_one_frame(loop, shape3d):
    body = cutout(box=(30, 70, 100, 150), color=(200, 60, 40))
    hat = cutout(box=(40, 10, 90, 60), color=(20, 20, 20))
    events = run(loop, shape3d, parts=[("body", body), ("hat", hat)], **FAST)
    stages = [(e["stage"], e["step"], e["total"]) for e in events if e["type"] == "progress"]
    assert ("conditioning", 2, 2) in stages and ("denoise", 2 * STEPS, 2 * STEPS) in stages
    assert stages[-2:] == [("texture", 1, 2), ("texture", 2, 2)]
    # each report names its part ("part 2/2"); a stage's steps count on over the parts
    progress = [e for e in events if e["type"] == "progress"]
    assert all(e["parts"] == 2 for e in progress)
    volume = [(e["part"], e["step"]) for e in progress if e["stage"] == "volume_decode"]
    assert volume == [(1 + (i > H.VOLUME_STEPS), i) for i in range(1, 2 * H.VOLUME_STEPS + 1)]

    scene = load_glb(events[-1]["data"])
    assert set(scene.graph.nodes_geometry) == {"body", "hat"}
    assert set(scene.geometry) == {"body", "hat"}
    bounds = {name: scene.geometry[name].bounds for name in ("body", "hat")}
    # in the image's frame: the union box (30..100 x 10..150) spans [-1, 1] vertically, y up
    scale = 2 / 140
    np.testing.assert_allclose(bounds["hat"][:, :2], [[(40 - 65) * scale, (80 - 60) * scale],
                                                      [(90 - 65) * scale, (80 - 10) * scale]],
                               atol=1e-5)
    np.testing.assert_allclose(bounds["body"][:, 1], [(80 - 150) * scale, (80 - 70) * scale],
                               atol=1e-5)
    meta = events[-1]["meta"]
    assert [p["name"] for p in meta["parts"]] == ["body", "hat"]
    assert meta["faces"] == sum(len(g.faces) for g in scene.geometry.values())


@pytest.mark.parametrize(("fields", "error", "words"), [
    (dict(image=IMAGE[..., :3].copy()), BadRequest, "send a cut-out"),
    (dict(image=np.full((64, 64, 4), 255, np.uint8)), BadRequest, "no transparency"),
    (dict(image=np.zeros((64, 64, 4), np.uint8)), Unprocessable, "fully transparent"),
    (dict(image=cutout(box=(10, 10, 30, 30))), Unprocessable, "at least 32 px"),
    (dict(image=IMAGE.astype(np.float32)), BadRequest, "uint8"),
    (dict(image=IMAGE, octree_resolution=8), Unprocessable, "octree_resolution"),
    (dict(image=IMAGE, octree_resolution=4096), Unprocessable, "octree_resolution"),
    (dict(image=IMAGE, target_face_count=10), Unprocessable, "target_face_count"),
    (dict(image=IMAGE, steps=0), Unprocessable, "steps"),
    (dict(), BadRequest, "either an image or parts"),
    (dict(image=IMAGE, parts=[("a", IMAGE)]), BadRequest, "either an image or parts"),
    (dict(parts=[]), BadRequest, "1 to 16 parts"),
    (dict(parts=[("hat", IMAGE), ("hat", IMAGE)]), BadRequest, "repeated: hat"),
    (dict(parts=[(" ", IMAGE)]), BadRequest, "non-empty name"),
    (dict(parts=[("a", IMAGE), ("b", cutout(h=200))]), BadRequest, "full image's size"),
    (dict(parts=[("a", IMAGE), ("b", IMAGE[..., :3].copy())]), BadRequest, "part 'b'"),
])
def test_bad_requests(fields, error, words):
    with pytest.raises(error, match=words):
        MeshRequest.build(**fields)


def test_server_limits_and_info(loop, shape3d):
    with pytest.raises(Unprocessable, match="limit, 512"):
        run(loop, shape3d, image=IMAGE, octree_resolution=1024)
    info = shape3d.info()
    assert info.model_type == f"{H.TINY_DIR}+texture=project"
    assert info.weights == "untrained" and len(info.checkpoint_sha256) == 64
    # texture: auto on the CPU projects, and /readyz's info says so and why
    assert info.note.startswith("colours are projected from the input view, not painted")
    assert "CUDA" in info.note
    assert alpha_box(IMAGE) == (30, 20, 100, 140)


def test_loader_modes(tiny, tmp_path, caplog):
    missing = MeshSettings(model=str(tmp_path))  # a directory without the subfolder
    with pytest.raises(ValueError):
        H.load_shape_pipeline(missing, "real", GENERATED)
    with caplog.at_level(logging.WARNING):
        model = H.load_shape_pipeline(missing, "auto", GENERATED)
    assert "FALLING BACK TO TINY" in caplog.text and not model.trained
    assert model.subfolder == H.TINY_SUBFOLDER and model.texture == "project"
    # a local directory in the official layout loads as itself
    local = H.load_shape_pipeline(MeshSettings(model=tiny, subfolder=H.TINY_SUBFOLDER), "real")
    assert local.source == tiny and local.device == "cpu"
    assert "CUDA" in model.texture_note  # auto projects on the CPU, and says why
    # paint runs anywhere: the tiny profile paints with the tiny paint weights
    painting = H.load_shape_pipeline(MeshSettings(texture="paint"), "tiny", GENERATED)
    assert painting.texture == "paint" and painting.painter.config.device == "cpu"


def test_flashvdm_decoding_on_the_tiny_model(tiny):
    from hy3dgen.shapegen.models.autoencoders import FlashVDMVolumeDecoding

    settings = MeshSettings(model=tiny, subfolder=H.TINY_SUBFOLDER, flashvdm=True,
                            texture="none")
    model = H.load_shape_pipeline(settings, "real")
    assert isinstance(model.pipeline.vae.volume_decoder, FlashVDMVolumeDecoding)

    class Recorder:
        reports: list[tuple[str, int, int]] = []

        def report(self, stage, step, total, part=None, parts=None):
            self.reports.append((stage, step, total))

        def artifact(self, *args): ...
        def check_cancelled(self): ...

    # 128: decoded at 63, then refined near the surface at 126
    recorder = Recorder()
    out = H.generate(model, MeshRequest.build(image=IMAGE, steps=STEPS, octree_resolution=128),
                     recorder, settings)
    assert out["meta"]["faces"] > 0 and out["meta"]["texture"] == "none"
    # FlashVDM's batches are not known beforehand: a step per batch, the last at the end
    volume = [(step, total) for stage, step, total in recorder.reports
              if stage == "volume_decode"]
    steps = [step for step, _ in volume]
    assert len(volume) >= 2 and steps == sorted(set(steps)) and volume[-1][0] == volume[-1][1]
