"""Serve scales the Gateway down (2 replicas to 1) while each replica runs a mesh job: the
replica Serve stops lets its job finish (``Gateway.__del__`` drains its jobs, within the
deployment's ``graceful_shutdown_timeout_s``), so both jobs succeed and none fails as lost.

Status is polled with plain GETs (no event stream held open): Serve waits for a stopping
replica's requests in flight by itself, and this test is about the jobs, which are tasks, not
requests. The app runs on a local Ray of its own in a subprocess (this module as a script),
against the session's redis-server, so that the remaining replica answers for the stopped one's
job; it prints its findings as one JSON line.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

from tests.helpers import free_port, print_report, run_driver
from tests.test_gateway_faults import REPLICA, submit_mesh

pytestmark = pytest.mark.cluster

REPORT = "GATEWAY-SCALE-DOWN-REPORT "
SHUTDOWN_S = 300  # the Gateway's graceful_shutdown_timeout_s: longer than a job here
FINISHED = {"succeeded", "failed", "cancelled"}


def main(cache_dir: str, redis_url: str) -> None:
    import httpx

    from atelier3d.serve import runner

    port = free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": False,
        "sessions": {"backend": "redis", "redis_url": redis_url, "redis_prefix": "scaledown"},
        "jobs": {"lease_s": 3.0, "drain_s": SHUTDOWN_S - 30,
                 "mesh": {"max_running": 1, "max_queued": 32}}})
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    gateway = deployments["Gateway"]
    gateway.update(num_replicas=2, graceful_shutdown_timeout_s=SHUTDOWN_S)
    # One Shape3D replica runs one shape at a time: the second job would show progress only
    # once the first had nearly finished. Two run both jobs side by side.
    deployments["Shape3D"]["num_replicas"] = 2
    runner.start(config, num_cpus=8)
    report: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            jobs: dict[str, str] = {}  # replica -> its job
            for _ in range(12):  # one job on each replica; any more are cancelled
                job_id, replica = submit_mesh(http, steps=200)
                if replica in jobs:
                    http.delete(f"/v1/jobs/{job_id}")
                else:
                    jobs[replica] = job_id
                if len(jobs) == 2:
                    break
            assert len(jobs) == 2, f"the proxy sent every job to one replica: {jobs}"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:  # both running, with progress
                states = [http.get(f"/v1/jobs/{j}").json() for j in jobs.values()]
                if all(s["status"] == "running" and s["progress"] > 0 for s in states):
                    break
                time.sleep(0.3)
            report["before"] = [s["status"] for s in states]

            gateway["num_replicas"] = 1
            # Serve stops one Gateway replica; the deployment is RUNNING again (``deploy``
            # returns) only once that replica has stopped, after its job
            scaling = threading.Thread(target=runner.deploy, args=(config,))
            scaling.start()
            scaled = time.monotonic()
            time.sleep(1.0)
            report["at_scale_down"] = [http.get(f"/v1/jobs/{j}").json()["status"]
                                       for j in jobs.values()]
            finals: dict[str, dict] = {}
            while time.monotonic() - scaled < SHUTDOWN_S and len(finals) < 2:
                for job_id in jobs.values():
                    if job_id not in finals:
                        state = http.get(f"/v1/jobs/{job_id}")
                        if state.status_code == 200 and state.json()["status"] in FINISHED:
                            finals[job_id] = state.json()
                time.sleep(0.5)
            report["finals"] = [{"status": finals[j]["status"], "error": finals[j]["error"]}
                                if j in finals else None for j in jobs.values()]
            report["ended_after_scale_down_s"] = round(time.monotonic() - scaled, 1)
            scaling.join(SHUTDOWN_S)
            report["scale_down_done_s"] = round(time.monotonic() - scaled, 1)
            # the stopped replica is gone once its job has finished
            deadline = time.monotonic() + 120
            replicas: set[str] = set()
            while time.monotonic() < deadline:
                replicas = {http.get("/healthz").headers.get(REPLICA) for _ in range(8)}
                if len(replicas) == 1:
                    break
                time.sleep(1)
            report["replicas_after"] = len(replicas)
            report["results"] = [http.get(f"/v1/jobs/{j}/result").content[:4] == b"glTF"
                                 for j in jobs.values()]
    finally:
        print_report(REPORT, report)
        runner.stop()


def test_scaling_the_gateway_down_lets_its_running_jobs_finish(tiny_dir, redis_url):
    report = run_driver("tests.test_gateway_scale_down", str(tiny_dir), redis_url,
                        marker=REPORT, timeout_s=560)
    assert report["before"] == ["running", "running"], report
    # the scale-down came while both jobs ran: one of them was on the replica Serve stopped
    assert report["at_scale_down"] == ["running", "running"], report
    assert [f and f["status"] for f in report["finals"]] == ["succeeded", "succeeded"], report
    assert report["replicas_after"] == 1 and all(report["results"]), report
    print(f"Gateway 2 -> 1 replicas mid-job: both jobs succeeded, "
          f"{report['ended_after_scale_down_s']} s after the scale-down began; the scale-down "
          f"was done after {report['scale_down_done_s']} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
