"""A whole model node dies (SIGKILL of its raylet and every process of it) under load.

Three ``ray start`` nodes on this machine: the head (Gateway, sessions in Redis) and two model
nodes (``model_node`` each, so the models may run on either). With clicks going and a mesh job
running, the node that holds the SAM encoder, and with it the session's embedding, is killed.
Ray Serve brings the lost replicas up on the surviving node; meanwhile every click ends as a
success or a 503 with Retry-After, the client's retries then succeed on the old session (its
embedding recomputed from the image kept in Redis), and the job ends succeeded (run again if
its replica was on the dead node), never lost.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from tests.helpers import (
    MODEL_DEPLOYMENTS,
    TWO_NODE_CONFIG,
    driver_env,
    end_driver,
    free_port,
    png_bytes,
    replica_nodes,
    run_driver,
)

pytestmark = pytest.mark.cluster

REPORT = "FAILOVER-REPORT "
NODES = ("models-a", "models-b")


def follow(http, job_id: str) -> list[dict]:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        return [json.loads(line) for line in stream.iter_lines() if line.strip()]


def main(address: str, dashboard_url: str, cache_dir: str, redis_url: str,
         pgids: str) -> None:
    import httpx
    import ray
    from ray import serve

    from atelier3d.clients.client import Client
    from atelier3d.samples import drawn_character
    from atelier3d.serve import runner

    pgid_of = json.loads(pgids)
    report: dict = {}
    ray.init(address=address, log_to_driver=False)
    try:
        name_of = {n["NodeID"]: next(name for name in NODES if name in n["Resources"])
                   for n in ray.nodes() if n["Alive"] and "model_node" in n["Resources"]}
        port = free_port()
        config = runner.load_serve_config(TWO_NODE_CONFIG, models="tiny", port=port, args_override={
            "cache_dir": cache_dir, "ui": False,
            "sessions": {"redis_url": redis_url, "redis_prefix": "failover"}})
        runner.deploy(config, timeout_s=240)
        before = replica_nodes(dashboard_url)
        victim = name_of[before["SamEncoder"][0]]
        report["before"] = {m: [name_of[n] for n in before[m]] for m in MODEL_DEPLOYMENTS}
        report["victim"] = victim

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=300) as http:
            r = http.post("/v1/sessions?wait=true",
                          files={"image": ("c.png", png_bytes(drawn_character(200, 256)))})
            sid = r.json()["session_id"]
            click = {"points": [[100, 140]], "labels": [1]}
            assert http.post(f"/v1/sessions/{sid}/segment", json=click).status_code == 200
            job = http.post("/v1/jobs/mesh", json={
                "session_id": sid, "source": {"kind": "original"}, "steps": 60,
                "octree_resolution": 64, "seed": 3}).json()["job_id"]
            while http.get(f"/v1/jobs/{job}").json()["status"] != "running":
                time.sleep(0.2)

            codes: list[int] = []
            bad: list[str] = []
            stop = threading.Event()

            def clicking() -> None:
                with httpx.Client(base_url=url, timeout=300) as client:
                    while not stop.is_set():
                        r = client.post(f"/v1/sessions/{sid}/segment", json=click)
                        codes.append(r.status_code)
                        ok_503 = (r.status_code == 503 and "Retry-After" in r.headers
                                  and r.json()["error"]["code"] == "unavailable")
                        if r.status_code != 200 and not ok_503:
                            bad.append(r.text[:300])
                        time.sleep(0.3)

            clicker = threading.Thread(target=clicking)
            clicker.start()
            time.sleep(1.0)
            killed_at = time.monotonic()
            os.killpg(pgid_of[victim], signal.SIGKILL)
            events = follow(http, job)  # the job, across the node's death
            report["job"] = {"types": [e["type"] for e in events if e["type"] != "progress"],
                             "progress_events": sum(e["type"] == "progress" for e in events),
                             "status": http.get(f"/v1/jobs/{job}").json()["status"]}
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:  # every model healthy again, off the dead node
                states = serve.status().applications["atelier3d"].deployments
                where = replica_nodes(dashboard_url)
                if all(str(states[m].status).endswith("HEALTHY") and where.get(m)
                       and victim not in (name_of.get(n) for n in where[m])
                       for m in MODEL_DEPLOYMENTS):
                    break
                time.sleep(1)
            report["recovered_s"] = round(time.monotonic() - killed_at, 1)
            time.sleep(2)
            stop.set()
            clicker.join()
            report["clicks"] = {"ok": codes.count(200), "retryable_503": codes.count(503),
                                "other": bad, "last": codes[-1] if codes else None}
            after = replica_nodes(dashboard_url)
            report["after"] = {m: [name_of.get(n, n) for n in after.get(m, [])]
                               for m in MODEL_DEPLOYMENTS}
            with Client(url, retries=8, backoff_s=1.0) as client:
                report["old_session_masks"] = len(client.segment(sid, points=[[90, 60]]).masks)
            http.delete(f"/v1/sessions/{sid}")
    finally:
        end_driver(REPORT, report)


def test_a_model_node_dies_under_load(tiny_dir, redis_url):
    from atelier3d.devcluster import LocalCluster

    cluster = LocalCluster()
    try:
        address = cluster.start_head(num_cpus=2, resources={"gateway": 1})
        pgids = {name: cluster.add_node(name, num_cpus=2,
                                        resources={"model_node": 1, name: 1}).pgid
                 for name in NODES}
        report = run_driver("tests.test_node_failover", address, cluster.dashboard_url,
                            str(tiny_dir), redis_url, json.dumps(pgids), marker=REPORT,
                            timeout_s=600, env=driver_env(cluster.env), logs=cluster.logs)
    finally:
        left = cluster.stop()
    assert left == [], f"processes of the cluster left running: {left}"
    print(f"node failover: {json.dumps(report)}")

    victim = report["victim"]
    survivor = next(name for name in NODES if name != victim)
    assert report["before"]["SamEncoder"] == [victim]
    for name in MODEL_DEPLOYMENTS:  # every model runs on the surviving node now
        assert report["after"][name] == [survivor], (name, report["after"])
    clicks = report["clicks"]
    assert clicks["other"] == [] and clicks["last"] == 200, clicks
    assert report["job"]["status"] == "succeeded", report["job"]
    assert report["job"]["types"][-1] == "succeeded", report["job"]
    if "Shape3D" in report["before"] and report["before"]["Shape3D"] == [victim]:
        assert "retrying" in report["job"]["types"], report["job"]
    assert report["old_session_masks"] == 3


if __name__ == "__main__":
    main(*sys.argv[1:6])
