"""Recipes over the real app (tiny weights, real HTTP): a recorded journey exported and replayed
by ``atelier3d replay`` gives the same masks, parse, edits and meshes; recipes for another
image or other models are refused."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import trimesh
from PIL import Image

from atelier3d import rle
from atelier3d.api.segment import MaskCandidate
from atelier3d.samples import drawn_character
from atelier3d.serve.sessions.records import pack_step, unpack_step
from atelier3d.serve.sessions.session import Step
from tests.helpers import ROOT, assert_error, png_bytes, uploaded

IMAGE = drawn_character()
SHIRT, FACE, SKIRT = (190, 260), (190, 90), (190, 420)
EDIT = {"preset": "free", "prompt": "make the shirt red", "negative_prompt": "blurry",
        "steps": 3, "seed": 11}
MESH = {"steps": 3, "octree_resolution": 64, "seed": 5, "texture": False}


def finished(http, job_id: str) -> dict:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert events[-1]["type"] == "succeeded", events[-1]
    return http.get(f"/v1/jobs/{job_id}").json()


def selected_mask(http, session_id: str, object_id: str) -> np.ndarray:
    state = http.get(f"/v1/sessions/{session_id}/objects/{object_id}").json()
    chosen = state["masks"][state["selected"]]["rle"]
    return rle.decode(chosen, IMAGE.shape[:2])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def geometry(glb: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    scene = trimesh.load(io.BytesIO(glb), file_type="glb", force="scene", process=False)
    return [(m.vertices, m.faces) for _, m in sorted(scene.geometry.items())]


@pytest.fixture(scope="module")
def journey(server):
    """A session as a user makes it: an object of three clicks (one refined, a candidate chosen
    by hand), a parse with options, an edit of the object, an edit of that edit, a mesh of the
    object; its recipe, and its outputs."""
    import httpx

    with httpx.Client(base_url=server, timeout=300) as http, uploaded(http, IMAGE) as sid:
        oid = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
        for body in ({"points": [SHIRT]}, {"points": [SHIRT, FACE], "labels": [1, 0]},
                     {"points": [SKIRT], "labels": [1], "refine": True}):
            body.setdefault("labels", [1])
            r = http.post(f"/v1/sessions/{sid}/segment", json={**body, "object_id": oid})
            assert r.status_code == 200, r.text
        chosen = (r.json()["selected"] + 1) % len(r.json()["masks"])
        assert http.post(f"/v1/sessions/{sid}/objects/{oid}/select",
                         json={"index": chosen}).status_code == 200
        parse = http.post(f"/v1/sessions/{sid}/parse", json={
            "object_id": oid, "groups": ["clothing"], "complete_occlusions": False})
        assert parse.status_code == 200, parse.text
        source = {"kind": "object", "object_id": oid}
        edit = http.post("/v1/jobs/edit", json={"session_id": sid, "source": source, **EDIT})
        assert edit.status_code == 202, edit.text
        edit_id = edit.json()["job_id"]
        finished(http, edit_id)
        again = http.post("/v1/jobs/edit", json={
            "session_id": sid, "source": {"kind": "job", "job_id": edit_id}, **EDIT})
        mesh = http.post("/v1/jobs/mesh", json={"session_id": sid, "source": source, **MESH})
        assert again.status_code == 202 and mesh.status_code == 202, (again.text, mesh.text)
        job_ids = [edit_id, again.json()["job_id"], mesh.json()["job_id"]]
        for job_id in job_ids[1:]:
            finished(http, job_id)
        recipe = http.get(f"/v1/sessions/{sid}/recipe")
        assert recipe.status_code == 200, recipe.text
        yield {
            "recipe": recipe.json(), "object_id": oid, "chosen": chosen,
            "mask": selected_mask(http, sid, oid),
            "parse": parse.json(), "jobs": job_ids,
            "results": [http.get(f"/v1/jobs/{j}/result").content for j in job_ids],
        }


def test_recipe_replays_to_identical_masks_edits_and_meshes(http, journey, tmp_path):
    recipe = journey["recipe"]
    assert recipe["schema_version"] == 1
    assert set(recipe["models"]) == {"sam_encoder", "sam_decoder", "human_parser",
                                     "image_editor", "shape3d"}
    ready = http.get("/readyz").json()["models"]
    for name, model in recipe["models"].items():
        assert model["checkpoint_sha256"] == ready[name]["checkpoint_sha256"]
        assert model["model_type"] == ready[name]["model_type"] and model["source"]
    [obj] = recipe["objects"]
    assert [s["refine"] for s in obj["steps"]] == [False, False, True]
    assert obj["steps"][-1]["selected"] == journey["chosen"]
    [parse] = recipe["parses"]
    assert parse["groups"] == ["clothing"] and parse["complete_occlusions"] is False
    edit, again, mesh = recipe["jobs"]
    # What the server chose is written down: steps, CFG and size; every mesh parameter.
    assert edit["seed"] == 11 and edit["steps"] == 3 and edit["negative_prompt"] == "blurry"
    assert edit["true_cfg_scale"] is not None and len(edit["output_size"]) == 2
    assert again["source"] == {"kind": "job", "job_id": edit["job_id"], "completed": False}
    assert {"guidance_scale", "num_chunks", "target_face_count"} <= set(mesh)
    assert "session_id" not in json.dumps(recipe)  # a session id is a capability

    recipe_path, image_path = tmp_path / "recipe.json", tmp_path / "character.png"
    recipe_path.write_text(json.dumps(recipe))
    image_path.write_bytes(png_bytes(IMAGE))
    out = tmp_path / "replayed"
    done = subprocess.run(
        [sys.executable, "-m", "atelier3d", "replay", str(recipe_path), "--image",
         str(image_path), "--server", str(http.base_url), "-o", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    replayed = json.loads((out / "replay.json").read_text())
    assert replayed["mismatched_masks"] == []
    sid = replayed["session_id"]
    try:
        new_object = replayed["objects"][journey["object_id"]]
        assert np.array_equal(selected_mask(http, sid, new_object), journey["mask"])
        new_parse = http.get(f"/v1/sessions/{sid}/parses/"
                             f"{replayed['parses'][journey['parse']['parse_id']]}").json()
        assert new_parse["masks"] == journey["parse"]["masks"]
        assert new_parse["object_id"] == new_object
        results = [(out / f"{job_id}{'.glb' if i == 2 else '.png'}").read_bytes()
                   for i, job_id in enumerate(journey["jobs"])]
        for before, after in zip(journey["results"][:2], results[:2], strict=True):
            np.testing.assert_array_equal(pixels(after), pixels(before))
        recorded_mesh = geometry(journey["results"][2])
        assert recorded_mesh and all(len(faces) for _, faces in recorded_mesh)
        for (v0, f0), (v1, f1) in zip(recorded_mesh, geometry(results[2]), strict=True):
            np.testing.assert_array_equal(v1, v0)
            np.testing.assert_array_equal(f1, f0)
        # The replayed session exports the same recipe, up to its ids.
        again = http.get(f"/v1/sessions/{sid}/recipe").json()
        assert again["image_sha256"] == recipe["image_sha256"]
        assert again["objects"][0]["steps"] == obj["steps"]
    finally:
        http.delete(f"/v1/sessions/{sid}")


def test_replay_refuses_other_models_and_other_images(http, journey):
    recipe = json.loads(json.dumps(journey["recipe"]))
    image = ("c.png", png_bytes(IMAGE), "image/png")
    other = recipe["models"]["image_editor"]
    other.update(model_type="Qwen/Qwen-Image-Edit-2511+none/none", checkpoint_sha256="ab" * 32)
    refused = http.post("/v1/recipes/replay", files={"image": image},
                        data={"recipe": json.dumps(recipe)})
    message = assert_error(refused, 422, "invalid_request")["message"]
    assert "image_editor: Qwen/Qwen-Image-Edit-2511" in message and "abababab" in message
    assert "shape3d" not in message  # only the models it lacks

    flipped = ("c.png", png_bytes(IMAGE[:, ::-1].copy()), "image/png")
    refused = http.post("/v1/recipes/replay", files={"image": flipped},
                        data={"recipe": json.dumps(journey["recipe"])})
    assert "not the recipe's" in assert_error(refused, 400, "bad_request")["message"]
    broken = http.post("/v1/recipes/replay", files={"image": image},
                       data={"recipe": json.dumps({**journey["recipe"], "schema_version": 9})})
    assert "schema_version" in assert_error(broken, 422)["message"]


def test_redis_step_records_keep_how_a_step_was_asked():
    """Sessions in Redis export the same recipe: a step's record keeps refine, mask_input and
    multimask."""
    mask = rle.encode(np.ones((1, 4, 4), bool))[0]
    candidate = MaskCandidate(rle=mask, score=0.5, bbox=(0, 0, 4, 4), area=16)
    step = Step(points=[(1.0, 2.0)], labels=[1], box=None, candidates=[candidate], low_res=None,
                selected=0, refine=True, mask_input=mask, multimask=False)
    back = unpack_step(pack_step(step), "uid")
    assert (back.refine, back.mask_input, back.multimask) == (True, mask, False)


def test_replay_cli_refuses_a_file_that_is_not_a_recipe(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"schema_version": 1, "objects": []}))
    done = subprocess.run(
        [sys.executable, "-m", "atelier3d", "replay", str(path), "--image", str(path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is not a recipe: image_sha256: Field required" in done.stderr
