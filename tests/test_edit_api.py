"""Edits as served jobs: real Ray Serve, real HTTP, the tiny Qwen-Image-Edit pipeline."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from atelier3d.samples import drawn_character
from tests.helpers import direct, one_thread, uploaded

STEPS = 3


@pytest.fixture(scope="module")
def session(server):
    with httpx.Client(base_url=server, timeout=120) as http, \
            uploaded(http, drawn_character()) as session_id:
        yield session_id


def submit(http, body: dict, key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    return http.post("/v1/jobs/edit", json=body, headers=headers)


def wait(http, job_id: str) -> list[dict]:
    """The job's events, streamed as NDJSON to the end."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def edit_body(session: str, **extra) -> dict:
    return {"session_id": session, "preset": "free", "prompt": "make the shirt red",
            "steps": STEPS, "seed": 7, **extra}


def test_edit_job_streams_one_event_per_step_then_the_result(http, session):
    r = submit(http, edit_body(session))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    events = wait(http, job_id)
    denoise = [e for e in events if e["type"] == "progress" and e["stage"] == "denoise"]
    assert [e["step"] for e in denoise] == list(range(1, STEPS + 1))
    assert all(e["total"] == STEPS for e in denoise)
    assert events[-1]["type"] == "succeeded" and events[-1]["progress"] == 1.0
    assert [e["seq"] for e in events] == list(range(len(events)))
    state = http.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "succeeded" and state["result_url"].endswith("/result")
    assert "denoise" in state["stage_ms"]
    png = http.get(state["result_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).mode == "RGB"
    # SSE replay of the finished job, from a Last-Event-ID
    with http.stream("GET", f"/v1/jobs/{job_id}/events",
                     headers={"Accept": "text/event-stream", "Last-Event-ID": "1"}) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        text = "".join(sse.iter_text())
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == list(range(2, len(events)))
    assert "event: succeeded" in text


def test_idempotency_key(http, session):
    body = edit_body(session, seed=11)
    first = submit(http, body, key="edit-key-1")
    again = submit(http, body, key="edit-key-1")
    assert first.status_code == again.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"]
    other = submit(http, {**body, "seed": 12}, key="edit-key-1")
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]["message"]
    wait(http, first.json()["job_id"])


def test_cancel_mid_run_frees_the_editor(http, session):
    job_id = submit(http, edit_body(session, steps=40)).json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            event = json.loads(line)
            if event["type"] == "progress" and event["stage"] == "denoise":
                break
    cancelled = http.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert http.delete(f"/v1/jobs/{job_id}").status_code == 409
    assert http.get(f"/v1/jobs/{job_id}/result").status_code == 409
    # The replica stopped at the next step: a new edit runs to the end.
    follow = submit(http, edit_body(session, steps=2)).json()["job_id"]
    assert wait(http, follow)[-1]["type"] == "succeeded"


def test_branch_from_a_previous_edit(http, session):
    first = submit(http, edit_body(session, steps=2)).json()["job_id"]
    wait(http, first)
    branch = submit(http, edit_body(session, steps=2, prompt="add a hat",
                                    source={"kind": "job", "job_id": first}))
    assert branch.status_code == 202, branch.text
    assert wait(http, branch.json()["job_id"])[-1]["type"] == "succeeded"


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"prompt": "  "}, 400, "prompt"),
    ({"preset": "cubism"}, 400, "preset"),
    ({"width": 100, "height": 100}, 422, "16"),
    ({"width": 100000, "height": 64}, 422, "size"),
    ({"mask": {"size": [3, 3], "counts": [9]}}, 400, "mask"),
    ({"source": {"kind": "job", "job_id": "job_nothere"}}, 404, "job"),
    ({"source": {"kind": "object", "object_id": "obj_nothere"}}, 404, "object"),
    ({"seed": -1}, 422, "seed"),
    ({"session_id": "ses_nothere"}, 404, "session"),
])
def test_bad_edit_requests_are_4xx(http, session, change, status, words):
    r = submit(http, {**edit_body(session), **change})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"].lower()


def test_jobs_of_another_session_are_not_sources(http, session):
    first = submit(http, edit_body(session, steps=1)).json()["job_id"]
    wait(http, first)
    with uploaded(http, np.full((64, 64, 3), 200, np.uint8)) as other:
        r = submit(http, edit_body(other, source={"kind": "job", "job_id": first}))
    assert r.status_code == 404 and "not found in this session" in r.json()["error"]["message"]


def test_unknown_job_and_format(http, session):
    assert http.get("/v1/jobs/job_nothere").status_code == 404
    assert http.get("/v1/jobs/job_nothere/events").status_code == 404
    job_id = submit(http, edit_body(session, steps=1)).json()["job_id"]
    wait(http, job_id)
    r = http.get(f"/v1/jobs/{job_id}/result", params={"format": "glb"})
    assert r.status_code == 400 and "png" in r.json()["error"]["message"]


def served_edit(http, body: dict) -> np.ndarray:
    job_id = submit(http, body).json()["job_id"]
    assert wait(http, job_id)[-1]["type"] == "succeeded"
    return np.asarray(Image.open(io.BytesIO(http.get(f"/v1/jobs/{job_id}/result").content)))


@pytest.mark.parametrize("images", [1, 2], ids=["one image", "with a reference image"])
def test_served_edit_equals_diffusers_with_the_lightning_lora_loaded_directly(
        http, session, tiny_dir, images):
    """The server runs the Lightning LoRA (its tiny stand-in in lightx2v's layout): a served edit
    is pixel-identical to diffusers' pipeline with that file given to load_lora_weights. With a
    reference image, the Plus pipeline runs the Qwen-Image-Edit-2509 transformer and its LoRA."""
    from atelier3d.models.edit.lightning import EDIT_2509_FILES, EDIT_FILES
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir

    extra = [{"kind": "original"}] * (images - 1)
    served = served_edit(http, edit_body(session, steps=None, width=256, height=256,
                                         extra_sources=extra))
    weights = EDIT_FILES[1] if images == 1 else EDIT_2509_FILES[1]  # the 8-step files
    with one_thread():
        expected = direct(tiny_edit_dir(tiny_dir, plus=images > 1), tiny_lightning_dir(tiny_dir),
                          weights, [drawn_character()] * images, steps=8,
                          prompt="make the shirt red", size=256, seed=7)
    np.testing.assert_array_equal(served, expected)
