"""A Gateway replica SIGKILLed while it runs a mesh job and has a second one queued behind it,
with two Gateway replicas on Redis sessions behind Serve's proxy: the client following the
running job's events (reconnecting with ``after=`` when its stream was on the dead replica) sees
it fail as retryable once the dead replica's lease lapses, never hangs; the queued job is taken
over by the surviving replica and succeeds.

The app runs on a local Ray of its own in a subprocess (this module as a script), against the
session's redis-server; it prints its findings as one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.helpers import CUTOUT, free_port, png_bytes, print_report, run_driver

pytestmark = pytest.mark.cluster

REPORT = "GATEWAY-FAULT-REPORT "
LEASE_S = 3.0
REPLICA = "x-atelier-replica"
FINISHED = {"succeeded", "failed", "cancelled"}


def gateway_pid(replica_id: str) -> int:
    import ray

    for actor in ray._private.state.actors().values():
        if actor["State"] == "ALIVE" and replica_id in (actor.get("Name") or ""):
            return actor["Pid"]
    raise AssertionError(f"no live actor for Gateway replica {replica_id}")


def follow(http, job_id: str, deadline_s: float) -> tuple[list[dict], int]:
    """The job's events to its last one, reconnecting (``after=``) when a stream breaks."""
    import httpx

    events: list[dict] = []
    reconnects = 0
    started = time.monotonic()
    while time.monotonic() - started < deadline_s and not (
            events and events[-1]["type"] in FINISHED):
        after = events[-1]["seq"] if events else -1
        try:
            with http.stream("GET", f"/v1/jobs/{job_id}/events",
                             params={"after": after}) as stream:
                if stream.status_code != 200:
                    raise httpx.HTTPError(f"status {stream.status_code}")
                for line in stream.iter_lines():
                    if line.strip():
                        events.append(json.loads(line))
        except httpx.HTTPError:
            reconnects += 1
            time.sleep(0.5)
    return events, reconnects


def submit_mesh(http, steps: int) -> tuple[str, str]:
    """A mesh job of the cut-out: its id and the Gateway replica that took it."""
    submitted = http.post("/v1/jobs/mesh", files={"image": ("c.png", png_bytes(CUTOUT))},
                          data={"request": json.dumps(
                              {"steps": steps, "octree_resolution": 64, "seed": 3})})
    assert submitted.status_code == 202, submitted.text
    return submitted.json()["job_id"], submitted.headers[REPLICA]


def main(cache_dir: str, redis_url: str) -> None:
    import httpx

    from atelier3d.serve import runner

    port = free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": False,
        "sessions": {"backend": "redis", "redis_url": redis_url, "redis_prefix": "gwfault"},
        # Each Gateway replica dispatches max_running: two of them stay within Shape3D's 3.
        "jobs": {"lease_s": LEASE_S, "mesh": {"max_running": 1, "max_queued": 32}}})
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Gateway":
            deployment["num_replicas"] = 2
    runner.start(config, num_cpus=8)
    report: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            job_id, runs_on = submit_mesh(http, steps=60)
            report["submit"] = 202
            # A second job queued behind it on the same replica (max_running 1 each); those
            # that land on the other replica are cancelled.
            queued_id = None
            for _ in range(12):
                other_id, replica = submit_mesh(http, steps=4)
                if replica == runs_on:
                    queued_id = other_id
                    break
                http.delete(f"/v1/jobs/{other_id}")
            assert queued_id is not None, "no second job reached the first one's replica"
            report["queued_before_kill"] = http.get(f"/v1/jobs/{queued_id}").json()["status"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # running, with progress, read via any replica
                state = http.get(f"/v1/jobs/{job_id}").json()
                if state["status"] != "queued" and state["progress"] > 0:
                    break
                time.sleep(0.2)
            report["before_kill"] = state["status"]
            os.kill(gateway_pid(runs_on), signal.SIGKILL)
            killed = time.monotonic()

            events, reconnects = follow(http, job_id, 120)
            report["ended_after_kill_s"] = round(time.monotonic() - killed, 2)
            report["reconnects"] = reconnects
            report["last"] = events[-1] if events else None
            report["seqs_ok"] = [e["seq"] for e in events] == list(
                range(events[0]["seq"], events[0]["seq"] + len(events))) if events else False
            final = http.get(f"/v1/jobs/{job_id}")
            report["final"] = {"code": final.status_code, "status": final.json().get("status"),
                               "error": final.json().get("error")}
            queued_events, _ = follow(http, queued_id, 240)
            report["queued_types"] = [e["type"] for e in queued_events]
            report["queued_seqs_ok"] = [e["seq"] for e in queued_events] == list(
                range(len(queued_events)))
            result = http.get(f"/v1/jobs/{queued_id}/result")
            report["queued_result"] = {"code": result.status_code, "bytes": len(result.content),
                                       "glb": result.content[:4] == b"glTF"}
    finally:
        print_report(REPORT, report)
        runner.stop()


def test_killed_gateway_fails_running_job_retryably_hands_over_queued_one(tiny_dir, redis_url):
    report = run_driver("tests.test_gateway_faults", str(tiny_dir), redis_url, marker=REPORT,
                        timeout_s=480)
    assert report["submit"] == 202 and report["before_kill"] == "running", report
    assert report["queued_before_kill"] == "queued", report
    last = report["last"]
    assert last is not None and last["type"] == "failed", report
    assert last["error"]["code"] == "gateway_lost" and last["error"]["retryable"], report
    assert report["seqs_ok"], report
    assert report["final"]["status"] == "failed", report
    assert report["final"]["error"]["retryable"] is True, report
    # the lease, the surviving replica's follower noticing, and Serve routing around the dead
    assert report["ended_after_kill_s"] < LEASE_S + 30, report
    # the queued one: taken over once by the surviving replica, run there to its result
    types = report["queued_types"]
    assert types.count("taken_over") == 1 and types[-1] == "succeeded", report
    assert "failed" not in types and report["queued_seqs_ok"], report
    assert report["queued_result"]["code"] == 200 and report["queued_result"]["glb"], report
    print(f"killed Gateway: its job failed retryably {report['ended_after_kill_s']} s after "
          f"the kill ({report['reconnects']} reconnects; lease {LEASE_S} s)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
