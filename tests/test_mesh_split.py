"""A mesh job in two halves: Shape3D (conditioning to surface extraction, the accelerator's) and
MeshFinish (clean-up, texture projection, GLB export: the CPU's). Real Ray Serve, tiny Hunyuan3D.

Over HTTP, on the test server (``mesh.stages: split`` is the default; ``test_mesh_api`` checks
that the served shape equals hy3dgen called directly): one event stream across the handover, and
cancelling works in it. Then one Shape3D replica and one MeshFinish replica, deployed beside the
server as two small applications and driven by the Gateway's own job service: the second job's
accelerator half starts while the first job's CPU half runs, and both results are whole.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from ray import serve

from atelier3d.config import AppConfig
from atelier3d.deployments.mesh import Shape3D
from atelier3d.deployments.mesh_finish import MeshFinish
from atelier3d.serve.app import model_slice
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.types import Artifact
from atelier3d.serve.mesh.service import mesh_kind
from atelier3d.serve.sessions.memory import MemorySessionStore
from atelier3d.stages.mesh import MeshRequest
from tests.helpers import CUTOUT as IMAGE
from tests.helpers import png_bytes

PARAMS = {"steps": 3, "octree_resolution": 64, "seed": 5}
GPU_HALF = ("conditioning", "denoise", "volume_decode", "mesh_extraction")


def submit(http, **params):
    return http.post("/v1/jobs/mesh", files={"image": ("cut.png", png_bytes(IMAGE))},
                     data={"request": json.dumps({**PARAMS, **params})})


def test_split_job_streams_one_event_log_across_both_halves(http):
    ready = http.get("/readyz")
    assert ready.status_code == 200 and "shape3d" in ready.json()["models"]
    # texture: auto on the CPU: /readyz says plainly that colours are projected, and why
    note = ready.json()["models"]["shape3d"]["note"]
    assert note.startswith("colours are projected from the input view, not painted") and \
        "CUDA" in note
    job_id = submit(http).json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert [e["seq"] for e in events] == list(range(len(events)))
    steps = [e["stage"] if e["type"] == "progress" else e["type"] for e in events]
    # the accelerator half, the handover (no event of its own), the CPU half; the long stages
    # report steps from inside
    assert [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s] == [
        "queued", "started", "conditioning", "denoise", "volume_decode", "mesh_extraction",
        "postprocess", "artifact", "texture", "succeeded"]
    assert steps.count("volume_decode") == 20 and steps.count("postprocess") == 3
    assert not any("surfaces" in e for e in events)  # the reference stays inside the Gateway
    state = http.get(f"/v1/jobs/{job_id}").json()
    # each half's stage timings reach the job; the untextured shape is served on its own
    assert set(state["stage_ms"]) == {*GPU_HALF, "postprocess", "texture"}
    assert set(state["result_meta"]["timings_ms"]) >= {*GPU_HALF, "postprocess", "texture"}
    assert state["artifacts"][0]["meta"]["texture"] == "none"
    assert http.get(state["artifacts"][0]["url"]).headers["content-type"] == "model/gltf-binary"


@pytest.mark.parametrize("stage", ["denoise", "mesh_extraction"])
def test_cancel_in_either_half(http, stage):
    """``denoise``: Shape3D is running it; ``mesh_extraction``'s last step: Shape3D's last
    report, the handover to MeshFinish comes next."""
    job_id = submit(http, steps=40).json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            event = json.loads(line)
            if (event["type"] == "progress" and event["stage"] == stage
                    and (stage == "denoise" or event["step"] == event["total"])):
                break
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    state = http.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "cancelled" and state["result_url"] is None
    # both halves' replicas are free for the next job
    again = submit(http).json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{again}/events") as response:
        assert json.loads(list(response.iter_lines())[-1])["type"] == "succeeded"


@pytest.fixture(scope="module")
def one_replica_each(server, tiny_dir):
    """One Shape3D and one MeshFinish replica on the server's Ray, as their own applications;
    pymeshlab's clean-up, so the CPU half is the longer one, as on a GPU."""
    config = AppConfig.model_validate({
        "models": "tiny", "cache_dir": str(tiny_dir), "mesh": {"postprocess": "pymeshlab"},
        "jobs": {"mesh": {"max_running": 2}}})
    section = model_slice(config, "mesh")
    # No CPU reserved: the test server holds the embedded Ray's logical CPUs.
    actor = {"num_cpus": 0, "num_gpus": 0}
    shape3d = serve.run(Shape3D.options(num_replicas=1, max_ongoing_requests=3,
                                        ray_actor_options=actor).bind(section),
                        name="split-shape3d", route_prefix=None)
    finish = serve.run(MeshFinish.options(num_replicas=1, max_ongoing_requests=2,
                                          ray_actor_options=actor).bind(section),
                       name="split-finish", route_prefix=None)
    yield config, shape3d, finish
    for name in ("split-shape3d", "split-finish"):
        serve.delete(name)


def test_next_jobs_gpu_half_runs_while_the_previous_finishes_on_the_cpu(one_replica_each):
    config, shape3d, finish = one_replica_each

    request = MeshRequest.build(image=IMAGE, target_face_count=500, **PARAMS)

    async def build() -> MeshRequest:
        return request

    def job_service(stages: str) -> JobService:
        jobs = JobService(config.jobs, MemorySessionStore(ttl_s=600, max_sessions=8,
                                                          max_per_client=8))
        chosen = config.model_copy(update={"mesh": config.mesh.model_copy(
            update={"stages": stages})})
        jobs.register(mesh_kind(chosen, shape3d, finish))
        return jobs

    async def two_jobs() -> tuple[list, list[Artifact]]:
        jobs = job_service("split")
        seen: list[tuple[float, int, dict]] = []

        async def follow(index: int, job_id: str) -> None:
            async for event in jobs.follow(job_id):
                seen.append((time.perf_counter(), index, event))

        submitted = [await jobs.submit("mesh", build, {"job": i}, session=None, client="test")
                     for i in range(2)]
        await asyncio.gather(*(follow(i, job.job_id) for i, job in enumerate(submitted)))
        return seen, [job.result for job in submitted]

    async def whole_job_on_shape3d() -> tuple[list[str], Artifact]:
        jobs = job_service("single")
        job = await jobs.submit("mesh", build, {}, session=None, client="test")
        events = [event async for event in jobs.follow(job.job_id)]
        return [e.get("stage", e["type"]) for e in events], job.result

    seen, results = asyncio.run(two_jobs())

    def first(index: int, kind: str) -> float:
        return next(t for t, i, e in seen
                    if i == index and kind in (e["type"], e.get("stage")))

    # one replica: the second job's accelerator half waits for the first's, then runs while
    # the first job's CPU half does
    assert first(0, "mesh_extraction") < first(1, "conditioning") < first(0, "succeeded")
    assert first(1, "succeeded") > first(0, "succeeded")
    # the same request twice: the same GLB, neither corrupted by the other
    assert results[0].data == results[1].data and results[0].meta["faces"] <= 500 * 1.02
    # mesh.stages: single, the path before the split, is still there and makes the same GLB
    stages, single = asyncio.run(whole_job_on_shape3d())
    assert stages[-3:] == ["artifact", "texture", "succeeded"]
    assert single.data == results[0].data
