"""Faults: model replicas killed by pid (SIGKILL) in the middle of real traffic.

Ray Serve replaces them; what the Gateway owes its clients meanwhile: every in-flight request
ends as a success or a 503 with Retry-After (never a 500), the client's retries succeed, the
sessions survive, and a job whose replica died runs again instead of being lost.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import ray

from atelier3d.clients.client import Client
from atelier3d.samples import drawn_character
from tests.helpers import CUTOUT, png_bytes, uploaded

CLICK = {"points": [[60, 80]], "labels": [1]}


def replica_pids(deployment: str) -> set[int]:
    """From the GCS actor table (the state API needs the dashboard, which the runner leaves
    out)."""
    actors = ray._private.state.actors().values()
    return {a["Pid"] for a in actors if a["State"] == "ALIVE"
            and a["ActorClassName"] == f"ServeReplica:atelier3d:{deployment}"}


def kill(deployment: str) -> set[int]:
    pids = replica_pids(deployment)
    assert pids, f"no live {deployment} replica"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def wait_replaced(deployment: str, dead: set[int], count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = replica_pids(deployment)
        if len(alive - dead) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{deployment} was not replaced within {timeout_s} s")


def assert_retryable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "unavailable"


@pytest.fixture(autouse=True)
def _same_ray(server) -> None:
    assert ray.is_initialized()  # the server fixture's Ray: its state API sees the replicas


def test_killed_decoder_and_encoder_mid_load(server, http) -> None:
    responses: list[httpx.Response] = []
    stop = threading.Event()

    def click_loop(session_id: str) -> None:
        with httpx.Client(base_url=server, timeout=120) as client:
            while not stop.is_set():
                responses.append(client.post(f"/v1/sessions/{session_id}/segment", json=CLICK))

    with uploaded(http, drawn_character()) as session_id:
        threads = [threading.Thread(target=click_loop, args=(session_id,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            dead_decoders = kill("SamDecoder")
            # An upload whose encode is in flight when its encoder dies.
            upload = http.post("/v1/sessions", files={"image": ("b.png", png_bytes(
                np.ascontiguousarray(drawn_character()[::-1])))})
            assert upload.status_code == 201, upload.text
            dead_encoders = kill("SamEncoder")
            wait_replaced("SamDecoder", dead_decoders, 1)
            wait_replaced("SamEncoder", dead_encoders, 1)
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, [r.text for r in responses if r.status_code not in
                                          (200, 503)]
        for response in responses:
            if response.status_code == 503:
                assert_retryable(response)
        assert codes[-1] == 200  # the clicks came back once the replica was replaced
        print(f"clicks during the kills: {codes.count(200)} ok, {codes.count(503)} retryable 503")

        # The sessions survived: the old one clicks on; the new one, whose encode was lost,
        # is encoded again from its stored image on first use. The client's retries absorb
        # whatever 503 is left.
        new_session = upload.json()["session_id"]
        with Client(server, retries=6, backoff_s=0.5) as client:
            for sid in (session_id, new_session):
                result = client.segment(sid, points=[[60, 80]])
                assert len(result.masks) == 3
        http.delete(f"/v1/sessions/{new_session}")


def test_mesh_job_on_a_killed_replica_runs_again(server, http) -> None:
    params = {"steps": 40, "octree_resolution": 64, "seed": 2}
    submitted = http.post("/v1/jobs/mesh", files={"image": ("cut.png", png_bytes(CUTOUT))},
                          data={"request": json.dumps(params)})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    events: list[dict] = []
    killed: set[int] = set()
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if not line.strip():
                continue
            events.append(json.loads(line))
            if not killed and events[-1]["type"] == "progress" and events[-1]["step"] >= 2:
                killed = kill("Shape3D")  # both replicas: the one running the job among them
    types = [e["type"] for e in events]
    assert killed and "retrying" in types, types
    retry = events[types.index("retrying")]
    assert retry["attempt"] == 2 and retry["reason"]
    assert types[-1] == "succeeded", events[-1]
    state = http.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "succeeded" and state["progress"] == 1.0
    result = http.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 200 and result.content[:4] == b"glTF"
    wait_replaced("Shape3D", killed, 2)
