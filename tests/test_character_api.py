"""Character to 3D over the /v1 API: real Ray Serve, real HTTP, the tiny parser, editor and
Hunyuan3D. One job parses a segmented character, completes a garment, (optionally) edits it
to a T-pose, checks it and builds a layered GLB; its stages' results are ordinary parses, edits
and meshes of the session, and a later job resumes from any stage without running the ones
before again."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import pytest
import trimesh
from PIL import Image

from atelier3d.samples import drawn_character
from atelier3d.serve.ui.character import stage_lines
from atelier3d.stages.parse import GARMENT_LABELS, LABELS
from tests.helpers import ROOT, assert_error, uploaded

STAGES = ["parse", "complete", "t_pose", "checks", "mesh"]
FIGURE_BOX = [90, 30, 300, 620]  # x0, y0, x1, y1 around the drawn figure
FAST = {"edit": {"steps": 1, "width": 256, "height": 256},
        "mesh": {"steps": 2, "octree_resolution": 64, "texture": False}}


def events_of(http: httpx.Client, job_id: str) -> list[dict]:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def stage_order(events: list[dict]) -> list[str]:
    order: list[str] = []
    for event in events:
        if event["type"] == "progress" and (not order or order[-1] != event["stage"]):
            order.append(event["stage"])
    return order


def artifacts(events: list[dict]) -> dict[str, dict]:
    return {e["name"]: e["meta"] for e in events if e["type"] == "artifact"}


def run(http: httpx.Client, session_id: str, body: dict) -> tuple[str, list[dict]]:
    r = http.post(f"/v1/sessions/{session_id}/character3d", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    events = events_of(http, job_id)
    assert events[-1]["type"] == "succeeded", events[-1]
    return job_id, events


def glb_nodes(data: bytes) -> set[str]:
    scene = trimesh.load(io.BytesIO(data), file_type="glb", force="scene", process=False)
    return set(scene.graph.nodes_geometry)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=300) as http:
        yield http


@pytest.fixture(scope="module")
def character(client):
    """A session with the drawn character segmented (the best of SAM's candidates for the box,
    as the CLI picks it), and the garment to complete: the largest one the character's parse
    says something hides."""
    with uploaded(client, drawn_character()) as session_id:
        obj = client.post(f"/v1/sessions/{session_id}/objects").json()["object_id"]
        seg = client.post(f"/v1/sessions/{session_id}/segment",
                          json={"box": FIGURE_BOX, "multimask": True, "object_id": obj})
        assert seg.status_code == 200, seg.text
        parse = client.post(f"/v1/sessions/{session_id}/parse", json={"object_id": obj}).json()
        hidden = [p for p in parse["parts"] if p["completed_url"] is not None
                  and p["name"] not in ("clothing", "hair", "body-skin")]
        assert hidden, "the tiny parser completed no garment of the drawn character"
        garment = max(hidden, key=lambda p: p["bbox"][2] * p["bbox"][3])["name"]
        yield session_id, obj, garment


@pytest.fixture(scope="module")
def first(client, character):
    """The whole journey without a T-pose: every stage runs."""
    session_id, obj, garment = character
    job_id, events = run(client, session_id, {"object_id": obj, "garments": [garment], **FAST})
    state = client.get(f"/v1/jobs/{job_id}").json()
    print(f"character job stage_ms {state['stage_ms']} total_s "
          f"{state['finished_at'] - state['started_at']:.1f}")  # shown with -s
    return job_id, events


def test_events_show_every_stage_in_order_with_monotonic_progress(first, character):
    _, _, garment = character
    job_id, events = first
    assert stage_order(events) == STAGES
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    # Each stage's progress is its own (steps of its total), ending done.
    for stage in STAGES:
        last = [e for e in events if e["type"] == "progress" and e["stage"] == stage][-1]
        assert last["step"] == last["total"], (stage, last)
    made = artifacts(events)
    assert list(made) == ["parse", f"complete.{garment}", "t_pose", "checks", "mesh"]
    assert made["t_pose"]["skipped"] is True
    assert {c["name"] for c in made["checks"]["checks"]} == {
        "full_body_visible", "facing_front", "t_or_a_pose", "clean_background"}


def test_glb_has_a_named_node_for_the_body_and_each_garment(client, first, character):
    _, _, garment = character
    job_id, events = first
    result = client.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "model/gltf-binary"
    nodes = glb_nodes(result.content)
    mesh = artifacts(events)["mesh"]
    assert nodes == set(mesh["nodes"])
    assert {"body", garment} <= nodes
    # Hair is a node unless the parse has none big enough, and then it says why.
    assert "hair" in nodes or "hair" in mesh["skipped"]
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert state["kind"] == "character" and state["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}/result?format=obj").status_code == 200


def test_intermediate_results_open_with_the_ordinary_routes(client, first, character):
    session_id, obj, garment = character
    job_id, _ = first
    results = client.get(f"/v1/jobs/{job_id}").json()["result_meta"]["results"]
    parse = client.get(f"/v1/sessions/{session_id}/parses/{results['parse_id']}")
    assert parse.status_code == 200 and parse.json()["object_id"] == obj
    assert results["checks_parse_id"] == results["parse_id"]  # no T-pose: the same parse
    edit_id = results["completed"][garment]
    edit = client.get(f"/v1/jobs/{edit_id}").json()
    assert edit["kind"] == "edit" and edit["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{edit_id}/result").headers["content-type"] == "image/png"
    mesh = client.get(f"/v1/jobs/{results['mesh_job_id']}").json()
    assert mesh["kind"] == "mesh" and mesh["status"] == "succeeded"
    same = client.get(f"/v1/jobs/{results['mesh_job_id']}/result").content
    assert same == client.get(f"/v1/jobs/{job_id}/result").content
    # An intermediate result is an ordinary source: a further edit of the completed garment.
    again = client.post("/v1/jobs/edit", json={
        "session_id": session_id, "source": {"kind": "job", "job_id": edit_id},
        "prompt": "make it red", "steps": 1, "width": 256, "height": 256})
    assert again.status_code == 202, again.text


def test_resume_from_mesh_reuses_earlier_results_without_rerunning(client, first, character):
    session_id, obj, garment = character
    first_id, _ = first
    before = client.get(f"/v1/jobs/{first_id}").json()["result_meta"]["results"]
    job_id, events = run(client, session_id, {
        "object_id": obj, "garments": [garment], **FAST, "resume_from": "mesh",
        "previous_job_id": first_id, "mesh": {**FAST["mesh"], "seed": 3}})
    assert stage_order(events) == STAGES
    made = artifacts(events)
    for stage in ("parse", "complete", "t_pose", "checks"):
        assert made[stage]["reused"] is True
        steps = [(e["step"], e["total"]) for e in events
                 if e["type"] == "progress" and e["stage"] == stage]
        assert steps == [(1, 1)], (stage, steps)  # marked done, nothing ran
    after = client.get(f"/v1/jobs/{job_id}").json()["result_meta"]["results"]
    assert {k: after[k] for k in ("parse_id", "completed", "checks_parse_id")} == \
        {k: before[k] for k in ("parse_id", "completed", "checks_parse_id")}
    assert after["mesh_job_id"] != before["mesh_job_id"]
    assert {"body", garment} <= glb_nodes(client.get(f"/v1/jobs/{job_id}/result").content)


def test_a_garment_nothing_hides_is_used_as_it_is(client, first, character):
    """Resumed at the completion with another garment, one the parse found nothing hiding: no
    edit runs for it, and its parse part is its layer."""
    session_id, obj, _ = character
    first_id, _ = first
    parse_id = client.get(f"/v1/jobs/{first_id}").json()["result_meta"]["results"]["parse_id"]
    parts = client.get(f"/v1/sessions/{session_id}/parses/{parse_id}").json()["parts"]
    seen = [p["name"] for p in parts if p["completed_url"] is None
            and p["name"] not in ("clothing", "hair", "body-skin")]
    assert seen, "the tiny parse has no garment that nothing hides"
    job_id, events = run(client, session_id, {
        "object_id": obj, "garments": seen[:1], **FAST, "resume_from": "complete",
        "previous_job_id": first_id})
    made = artifacts(events)
    assert made[f"complete.{seen[0]}"]["job_id"] is None
    assert made[f"complete.{seen[0]}"]["reason"] == "nothing hides it"
    assert [e for e in events if e["type"] == "progress" and e["stage"] == "complete"][-1][
        "step"] == 100
    mesh = made["mesh"]
    assert seen[0] in mesh["nodes"] or seen[0] in mesh["skipped"]


def test_t_pose_from_the_completed_garments(client, first, character):
    """Resumed at the T-pose: the completion is reused; the T-pose edit's own parse is what is
    checked and cut into layers."""
    session_id, obj, garment = character
    first_id, _ = first
    before = client.get(f"/v1/jobs/{first_id}").json()["result_meta"]["results"]
    job_id, events = run(client, session_id, {
        "object_id": obj, "garments": [garment], "t_pose": True, **FAST,
        "resume_from": "t_pose", "previous_job_id": first_id})
    assert stage_order(events) == STAGES
    results = client.get(f"/v1/jobs/{job_id}").json()["result_meta"]["results"]
    assert results["completed"] == before["completed"]
    t_pose = client.get(f"/v1/jobs/{results['t_pose_job_id']}").json()
    assert t_pose["kind"] == "edit" and t_pose["status"] == "succeeded"
    assert results["checks_parse_id"] not in (None, before["parse_id"])
    checked = client.get(f"/v1/sessions/{session_id}/parses/{results['checks_parse_id']}")
    assert checked.status_code == 200
    assert artifacts(events)["checks"]["parse_id"] == results["checks_parse_id"]
    nodes = glb_nodes(client.get(f"/v1/jobs/{job_id}/result").content)
    assert nodes == set(artifacts(events)["mesh"]["nodes"]) and nodes


def test_cancel_mid_stage_keeps_what_the_stages_before_made(client, first, character):
    """Cancelled through the job route while its T-pose edit runs: the job ends cancelled, the
    checks and mesh never start, what the stages before made still opens, and the session goes
    on: a job resumed from the cancelled one runs to the end."""
    session_id, obj, garment = character
    first_id, _ = first
    before = client.get(f"/v1/jobs/{first_id}").json()["result_meta"]["results"]
    body = {"object_id": obj, "garments": [garment], "t_pose": True, "resume_from": "t_pose",
            "previous_job_id": first_id, "mesh": FAST["mesh"],
            "edit": {**FAST["edit"], "steps": 40}}  # long enough to be cancelled mid-run
    r = client.post(f"/v1/sessions/{session_id}/character3d", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            event = json.loads(line)
            assert event["type"] not in ("succeeded", "failed"), event
            if event["type"] == "progress" and event["stage"] == "t_pose" and event["step"] > 0:
                break  # the T-pose edit is denoising
    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    events = events_of(client, job_id)
    assert events[-1]["type"] == "cancelled"
    assert stage_order(events) == ["parse", "complete", "t_pose"]
    assert not [e for e in events if e["type"] == "result"]
    assert list(artifacts(events)) == ["parse", "complete"]
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "cancelled" and state["result_url"] is None
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409
    # What the stages before the cancel made still opens: the job's own records of them, and
    # the parse and completion they name, through the ordinary routes.
    kept = client.get(f"/v1/jobs/{job_id}/result?artifact=complete")
    assert kept.status_code == 200, kept.text
    assert kept.json()["results"]["completed"] == before["completed"]
    parse = client.get(f"/v1/sessions/{session_id}/parses/{before['parse_id']}")
    assert parse.status_code == 200 and parse.json()["object_id"] == obj
    edit_id = before["completed"][garment]
    assert client.get(f"/v1/jobs/{edit_id}").json()["status"] == "succeeded"
    completed = client.get(f"/v1/jobs/{edit_id}/result")
    assert completed.status_code == 200 and completed.content.startswith(b"\x89PNG")

    # The session goes on, from what the cancelled job kept: its T-pose again, then the rest.
    assert client.get(f"/v1/sessions/{session_id}").status_code == 200
    job_id2, events2 = run(client, session_id, {**body, "previous_job_id": job_id,
                                                "edit": FAST["edit"]})
    assert stage_order(events2) == STAGES
    results = client.get(f"/v1/jobs/{job_id2}").json()["result_meta"]["results"]
    assert results["parse_id"] == before["parse_id"]
    assert results["completed"] == before["completed"]
    assert client.get(f"/v1/jobs/{results['t_pose_job_id']}").json()["status"] == "succeeded"
    assert glb_nodes(client.get(f"/v1/jobs/{job_id2}/result").content)


def test_bad_requests_are_4xx(client, first, character):
    session_id, obj, garment = character
    url = f"/v1/sessions/{session_id}/character3d"
    r = client.post(url, json={"object_id": obj, "garments": ["Cape"]})
    assert "unknown garment 'Cape'" in assert_error(r, 400)["message"]
    assert_error(client.post(url, json={"object_id": "obj_nope"}), 404)
    empty = client.post(f"/v1/sessions/{session_id}/objects").json()["object_id"]
    assert "no mask" in assert_error(client.post(url, json={"object_id": empty}), 409)["message"]
    assert_error(client.post(url, json={"garments": [garment]}), 422)
    r = client.post(url, json={"object_id": obj, "resume_from": "mesh"})
    assert "previous_job_id" in assert_error(r, 409)["message"]
    first_id, _ = first
    edit_id = client.get(f"/v1/jobs/{first_id}").json()["result_meta"]["results"][
        "completed"][garment]
    r = client.post(url, json={"object_id": obj, "resume_from": "mesh",
                               "previous_job_id": edit_id})
    assert "not a character job" in assert_error(r, 400)["message"]
    # A garment the reused parse does not have.
    parse_id = client.get(f"/v1/jobs/{first_id}").json()["result_meta"]["results"]["parse_id"]
    names = {p["name"] for p in client.get(
        f"/v1/sessions/{session_id}/parses/{parse_id}").json()["parts"]}
    absent = next(LABELS[i] for i in GARMENT_LABELS if LABELS[i] not in names)
    r = client.post(url, json={"object_id": obj, "garments": [absent], "resume_from": "complete",
                               "reuse": {"parse_id": parse_id}})
    assert f"has no {absent}" in assert_error(r, 422)["message"]
    assert_error(client.post("/v1/sessions/nope/character3d", json={"object_id": obj}), 404)


def test_cli_character_writes_the_asset_and_each_stage(server, character, tmp_path):
    """The CLI (through ``Client.submit_character``): the same journey from an image file."""
    _, _, garment = character
    image = tmp_path / "character.png"
    Image.fromarray(drawn_character()).save(image)
    out = tmp_path / "out"
    box = ",".join(map(str, FIGURE_BOX))
    common = [sys.executable, "-m", "atelier3d", "character", str(image), "--server", server,
              "--box", box, "--quiet"]
    done = subprocess.run(
        [*common, "--garment", garment, "--steps", "1", "--mesh-steps", "2", "--octree", "64",
         "--no-texture", "-o", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "character: succeeded" in done.stdout and "check facing_front" in done.stdout
    summary = json.loads((out / "stages.json").read_text())
    assert list(summary["stages"]) == ["parse", f"complete.{garment}", "t_pose", "checks",
                                       "mesh"]
    assert (out / f"complete.{garment}.png").read_bytes().startswith(b"\x89PNG")
    nodes = glb_nodes((out / "character.glb").read_bytes())
    assert {"body", garment} <= nodes == set(summary["stages"]["mesh"]["nodes"])

    bad = subprocess.run([*common, "--garment", "Cape", "-o", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 1 and "unknown garment 'Cape'" in bad.stderr


def test_ui_tab_lists_the_stages(client, first):
    """The UI's Character → 3D tab is on the page, and what it shows of a job's events: each
    stage done, with what it made."""
    page = client.get("/config")
    assert page.status_code == 200
    assert "character-run" in page.text and "character-stages" in page.text
    _, events = first
    shown = stage_lines(events)
    assert shown.startswith("**100%**")
    assert [line[:4] for line in shown.splitlines()[2:]] == ["- ✓ "] * len(STAGES)
    assert "(skipped)" in shown.splitlines()[4]  # the T-pose, not asked for
    started = next(i for i, e in enumerate(events) if e["type"] == "progress")
    assert "- … Parse the character (0/1)" in stage_lines(events[:started + 1])
