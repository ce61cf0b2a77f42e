"""Load test of a running atelier3d (any URL): the journeys real users make, through the API.

    locust -f benchmarks/locustfile.py --headless -u 20 -r 2 -t 5m --host http://127.0.0.1:8000

Two kinds of user, weighted like the product's traffic:

- ``Clicker`` (most users): uploads a picture, then segments it with clicks and a think time
  between them, several objects, a cut-out; sometimes parses the character; leaves.
- ``Creator`` (few): the same start, then one edit job and one mesh job of the cut-out, followed
  through their event streams to the end.

Every request is named by its route (ids stripped) so Locust's table groups them; a 503 with
Retry-After counts as a failure named "back-pressure", which is what an overloaded system is
supposed to answer. Settings by environment: ``ATELIER3D_EDIT_STEPS`` (default 4),
``ATELIER3D_MESH_STEPS`` (5), ``ATELIER3D_MESH_OCTREE`` (64): small, so a CPU box copes.

Every simulated user comes from the load generator's one address, which the server's fair-use
limits count as one client: list that address in the target's ``fair_use.exempt`` (and raise
``limits.max_sessions_per_client``), or the run measures the rate limits. A 429 counts as a
failure named "rate-limited".
"""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
from locust import HttpUser, between, task
from PIL import Image

from atelier3d.samples import drawn_character

EDIT_STEPS = int(os.environ.get("ATELIER3D_EDIT_STEPS", 4))
MESH_STEPS = int(os.environ.get("ATELIER3D_MESH_STEPS", 5))
MESH_OCTREE = int(os.environ.get("ATELIER3D_MESH_OCTREE", 64))


def picture() -> bytes:
    """The drawn character with a little noise, so no two uploads are the same image."""
    image = drawn_character().astype(np.int16)
    image += np.random.default_rng().integers(-6, 7, image.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Journey(HttpUser):
    abstract = True

    def _post(self, url: str, name: str, **kwargs):
        with self.client.post(url, name=name, catch_response=True, **kwargs) as response:
            if response.status_code == 503:
                response.failure("back-pressure")
            elif response.status_code == 429:
                response.failure("rate-limited")
            elif not response.ok:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            return response

    def start_session(self) -> tuple[str, str] | None:
        """Uploads, waits for the encode, segments one object; ``(session, object)``."""
        r = self._post("/v1/sessions?wait=true", "POST /v1/sessions",
                       files={"image": ("character.png", picture())})
        if not r.ok:
            return None
        session = r.json()["session_id"]
        h, w = r.json()["height"], r.json()["width"]
        obj = self._post(f"/v1/sessions/{session}/objects", "POST /objects")
        if not obj.ok:
            return None
        object_id = obj.json()["object_id"]
        for _ in range(random.randint(2, 5)):
            self.wait()  # think time between clicks
            point = [random.uniform(0.3, 0.7) * w, random.uniform(0.3, 0.7) * h]
            self._post(f"/v1/sessions/{session}/segment", "POST /segment",
                       json={"points": [point], "labels": [1], "object_id": object_id})
        return session, object_id

    def end_session(self, session: str) -> None:
        self.client.delete(f"/v1/sessions/{session}", name="DELETE /v1/sessions")

    def follow(self, job_id: str, name: str) -> None:
        with self.client.get(f"/v1/jobs/{job_id}/events", name=name, stream=True,
                             catch_response=True) as response:
            last = None
            for line in response.iter_lines():
                if line:
                    last = json.loads(line)
            if last is None or last["type"] != "succeeded":
                response.failure(f"job ended as {last and last['type']}")


class Clicker(_Journey):
    weight = 9
    wait_time = between(1, 3)

    @task
    def segment_and_cut_out(self) -> None:
        started = self.start_session()
        if started is None:
            return
        session, object_id = started
        self._post(f"/v1/sessions/{session}/cutout", "POST /cutout",
                   json={"object_id": object_id})
        if random.random() < 0.3:
            self._post(f"/v1/sessions/{session}/parse", "POST /parse",
                       json={"object_id": object_id})
        self.end_session(session)


class Creator(_Journey):
    weight = 1
    wait_time = between(2, 5)

    @task
    def edit_then_mesh(self) -> None:
        started = self.start_session()
        if started is None:
            return
        session, object_id = started
        source = {"kind": "object", "object_id": object_id}
        edit = self._post("/v1/jobs/edit", "POST /v1/jobs/edit", json={
            "session_id": session, "source": source, "preset": "free",
            "prompt": "make the outfit red", "steps": EDIT_STEPS, "width": 256, "height": 256})
        if edit.ok:
            self.follow(edit.json()["job_id"], "GET /v1/jobs/{id}/events (edit)")
        mesh = self._post("/v1/jobs/mesh", "POST /v1/jobs/mesh", json={
            "session_id": session, "source": source, "steps": MESH_STEPS,
            "octree_resolution": MESH_OCTREE})
        if mesh.ok:
            self.follow(mesh.json()["job_id"], "GET /v1/jobs/{id}/events (mesh)")
        self.end_session(session)
