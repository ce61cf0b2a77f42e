"""Meshes as served jobs: real Ray Serve (two Shape3D replicas), real HTTP, tiny Hunyuan3D."""

from __future__ import annotations

import concurrent.futures
import io
import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from atelier3d.config import MeshSettings
from atelier3d.models.mesh import hunyuan3d as H
from atelier3d.samples import drawn_character
from tests.helpers import CUTOUT as IMAGE
from tests.helpers import cutout, png_bytes, uploaded

STEPS, OCTREE = 3, 64
PARAMS = {"steps": STEPS, "octree_resolution": OCTREE, "seed": 5}


def submit_upload(http, image: np.ndarray, **params):
    return http.post("/v1/jobs/mesh", files={"image": ("cut.png", png_bytes(image))},
                     data={"request": json.dumps({**PARAMS, **params})})


def events_of(http, job_id: str) -> list[dict]:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def glb_mesh(data: bytes) -> trimesh.Trimesh:
    scene = trimesh.load(io.BytesIO(data), file_type="glb", force="scene", process=False)
    (mesh,) = scene.geometry.values()
    return mesh


@pytest.fixture(scope="module")
def direct_shape(tiny_dir) -> trimesh.Trimesh:
    """hy3dgen's pipeline called directly on the same checkpoint, image and seed, then the same
    post-processing, with the replica's one torch thread (so the sums add up the same way)."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
            str(H.tiny_shape3d_dir(tiny_dir)), subfolder=H.TINY_SUBFOLDER, device="cpu",
            dtype=torch.float32)
        settings = MeshSettings()
        mesh = pipeline(
            image=Image.fromarray(IMAGE), num_inference_steps=STEPS,
            guidance_scale=settings.guidance_scale, generator=torch.Generator().manual_seed(5),
            octree_resolution=OCTREE, num_chunks=settings.num_chunks,
            mc_level=settings.mc_level, output_type="trimesh", enable_pbar=False)[0]
        return H.postprocess(mesh, settings.target_face_count, settings.postprocess)
    finally:
        torch.set_num_threads(threads)


def assert_same_shape(glb: bytes, expected: trimesh.Trimesh) -> None:
    mesh = glb_mesh(glb)
    assert np.array_equal(mesh.faces, expected.faces)
    np.testing.assert_array_equal(mesh.vertices, expected.vertices.astype(np.float32))


def test_served_mesh_equals_hy3dgen_direct_and_streams_stages(http, direct_shape):
    r = submit_upload(http, IMAGE)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    events = events_of(http, job_id)
    progress_events = [e for e in events if e["type"] == "progress"]
    stages = [e["stage"] for e in progress_events]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == [
        "conditioning", "denoise", "volume_decode", "mesh_extraction", "postprocess", "texture"]
    assert [e["step"] for e in progress_events if e["stage"] == "denoise"] == [1, 2, 3]
    # the volume decode reports from inside (20 steps of its 35 batches), each moving the bar
    volume = [e for e in progress_events if e["stage"] == "volume_decode"]
    assert [(e["step"], e["total"]) for e in volume] == [(i, 20) for i in range(1, 21)]
    assert all(b["progress"] > a["progress"] for a, b in zip(volume, volume[1:], strict=False))
    kinds = [e["type"] for e in events]
    assert kinds.index("artifact") < kinds.index("succeeded") == len(kinds) - 1
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0

    state = http.get(f"/v1/jobs/{job_id}").json()
    assert [a["name"] for a in state["artifacts"]] == ["shape"]
    assert set(state["stage_ms"]) >= {"denoise", "volume_decode", "texture"}
    shape = http.get(state["artifacts"][0]["url"])
    assert shape.headers["content-type"] == "model/gltf-binary"
    assert_same_shape(shape.content, direct_shape)
    result = http.get(f"/v1/jobs/{job_id}/result")
    textured = glb_mesh(result.content)
    colours = textured.visual.vertex_colors
    assert colours is not None and len(np.unique(colours[:, :3], axis=0)) > 1
    assert np.array_equal(textured.faces, direct_shape.faces)
    for fmt, magic in (("obj", b"v "), ("ply", b"ply"), ("stl", b"")):
        converted = http.get(f"/v1/jobs/{job_id}/result", params={"format": fmt})
        assert converted.status_code == 200 and magic in converted.content[:200]
    bad = http.get(f"/v1/jobs/{job_id}/result", params={"format": "fbx"})
    assert bad.status_code == 400 and "glb" in bad.json()["error"]["message"]


def test_three_concurrent_jobs_on_two_replicas_all_correct(http, direct_shape):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(lambda _: submit_upload(http, IMAGE).json()["job_id"], range(3)))
    states = []
    for job_id in ids:
        assert events_of(http, job_id)[-1]["type"] == "succeeded"
        states.append(http.get(f"/v1/jobs/{job_id}").json())
        assert_same_shape(http.get(f"/v1/jobs/{job_id}/result?artifact=shape").content,
                          direct_shape)  # none corrupted by another
    spans = sorted((s["started_at"], s["finished_at"]) for s in states)
    assert spans[1][0] < spans[0][1], "two replicas: the first two jobs ran at the same time"


def test_cancel_mid_run(http):
    job_id = submit_upload(http, IMAGE, steps=150).json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            event = json.loads(line)
            if event["type"] == "progress" and event["stage"] == "denoise":
                break
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    state = http.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "cancelled" and state["result_url"] is None


def test_session_object_and_layered_parts(http):
    image = drawn_character()
    with uploaded(http, image) as session_id:
        objects = []
        for box in ([20, 20, 200, 200], [200, 100, 380, 300]):
            obj = http.post(f"/v1/sessions/{session_id}/objects").json()["object_id"]
            http.post(f"/v1/sessions/{session_id}/segment",
                      json={"box": box, "object_id": obj, "multimask": True})
            objects.append(obj)
        single = http.post("/v1/jobs/mesh", json={
            "session_id": session_id, "source": {"kind": "object", "object_id": objects[0]},
            "texture": False, **PARAMS})
        assert single.status_code == 202, single.text
        layered = http.post("/v1/jobs/mesh", json={
            "session_id": session_id, **PARAMS,
            "parts": [{"name": f"part {i}", "source": {"kind": "object", "object_id": o}}
                      for i, o in enumerate(objects)]})
        assert layered.status_code == 202, layered.text
        for job in (single, layered):
            assert events_of(http, job.json()["job_id"])[-1]["type"] == "succeeded"
        data = http.get(f"/v1/jobs/{layered.json()['job_id']}/result").content
        scene = trimesh.load(io.BytesIO(data), file_type="glb", force="scene", process=False)
        assert set(scene.graph.nodes_geometry) == {"part 0", "part 1"}
        # a job source cannot be lined up with the image's other parts
        mixed = http.post("/v1/jobs/mesh", json={
            "session_id": session_id, "parts": [
                {"name": "a", "source": {"kind": "job", "job_id": single.json()["job_id"]}}]})
        assert mixed.status_code == 400 and "line up" in mixed.json()["error"]["message"]
    # the session went, and its jobs with it
    assert http.get(f"/v1/jobs/{single.json()['job_id']}").status_code == 404


def test_bad_mesh_requests_are_4xx(http):
    rgb = http.post("/v1/jobs/mesh", files={"image": ("c.png", png_bytes(IMAGE[..., :3]))})
    assert rgb.status_code == 400 and "alpha" in rgb.json()["error"]["message"]
    empty = IMAGE.copy()
    empty[..., 3] = 0
    r = submit_upload(http, empty)
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    r = submit_upload(http, cutout(box=(10, 10, 20, 20)))
    assert r.status_code == 422 and "at least" in r.json()["error"]["message"]
    r = submit_upload(http, IMAGE, octree_resolution=4)
    assert r.status_code == 422 and "octree" in r.json()["error"]["message"]
    r = http.post("/v1/jobs/mesh", json={"source": {"kind": "original"}})
    assert r.status_code == 400 and "session_id" in r.json()["error"]["message"]
    r = http.post("/v1/jobs/mesh", files={"image": ("c.png", b"not an image")})
    assert r.status_code == 415
    r = http.post("/v1/jobs/mesh", files={"image": ("c.png", png_bytes(IMAGE))},
                  data={"request": "{not json"})
    assert r.status_code == 422
