"""A real two-node Ray cluster on this machine: the Gateway on the head, every model on a second
node (a custom resource, ``model_node``, standing for a GPU node), sessions in Redis.

Two ``ray start`` processes (``atelier3d.devcluster``: temp dirs and ports of their own, each in
a process group of its own, all ended afterwards, failure or not), the app deployed from
``atelier3d/serve/configs/two-node.yaml`` with tiny weights by a driver in a subprocess (this
module as a script; it prints its findings as one JSON line). Ray's state API says where each
replica runs; then upload → segment → parse → edit job → mesh job (of the edit) over real HTTP,
every model call crossing nodes.
"""

from __future__ import annotations

import json
import sys
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

REPORT = "MULTINODE-REPORT "


def main(address: str, dashboard_url: str, cache_dir: str, redis_url: str) -> None:
    import httpx
    import ray

    from atelier3d.samples import drawn_character
    from atelier3d.serve import runner

    report: dict = {}
    started = time.monotonic()
    ray.init(address=address, log_to_driver=False)
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        report["head"] = [i for i, r in nodes.items() if "gateway" in r]
        report["model_node"] = [i for i, r in nodes.items() if "model_node" in r]
        port = free_port()
        config = runner.load_serve_config(TWO_NODE_CONFIG, models="tiny", port=port, args_override={
            "cache_dir": cache_dir, "ui": False,
            "sessions": {"redis_url": redis_url, "redis_prefix": "multinode"}})
        runner.deploy(config, timeout_s=240)
        report["deploy_s"] = round(time.monotonic() - started, 1)
        report["replicas"] = replica_nodes(dashboard_url)

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=180) as http:
            image = drawn_character(200, 256)
            r = http.post("/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(image))})
            report["gateway_node"] = r.headers.get("x-atelier-node")
            sid = r.json()["session_id"]
            obj = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
            clicks = []
            for x, y in [(100, 140), (90, 60), (110, 200)]:
                r = http.post(f"/v1/sessions/{sid}/segment",
                              json={"points": [[x, y]], "labels": [1], "object_id": obj})
                clicks.append(r.status_code)
            report["segment"] = {"status": clicks, "timings_ms": r.json()["timings_ms"],
                                 "masks": len(r.json()["masks"])}
            r = http.post(f"/v1/sessions/{sid}/parse", json={"object_id": obj})
            report["parse"] = {"status": r.status_code,
                               "parts": len(r.json().get("parts", []))}
            r = http.post("/v1/jobs/edit", json={
                "session_id": sid, "source": {"kind": "object", "object_id": obj},
                "preset": "free", "prompt": "make the shirt red", "steps": 2, "seed": 7,
                "width": 256, "height": 256})
            edit = r.json()["job_id"]
            report["edit"] = job_outcome(http, edit, r.status_code)
            r = http.post("/v1/jobs/mesh", json={
                "session_id": sid, "source": {"kind": "job", "job_id": edit},
                "steps": 2, "octree_resolution": 64, "seed": 1})
            mesh = r.json()["job_id"]
            report["mesh"] = job_outcome(http, mesh, r.status_code)
            glb = http.get(f"/v1/jobs/{mesh}/result")
            report["mesh"]["glb"] = [glb.status_code, glb.content[:4].decode("latin-1")]
            http.delete(f"/v1/sessions/{sid}")
        report["total_s"] = round(time.monotonic() - started, 1)
    finally:
        end_driver(REPORT, report)


def job_outcome(http, job_id: str, submitted: int) -> dict:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        events = [json.loads(line) for line in stream.iter_lines() if line.strip()]
    state = http.get(f"/v1/jobs/{job_id}").json()
    return {"submit": submitted, "last_event": events[-1]["type"] if events else None,
            "status": state["status"], "error": state.get("error")}


def test_models_on_a_second_node_gateway_on_the_head(tiny_dir, redis_url):
    from atelier3d.devcluster import LocalCluster

    cluster = LocalCluster()
    try:
        address = cluster.start_head(num_cpus=2, resources={"gateway": 1})
        cluster.add_node("models", num_cpus=2, resources={"model_node": 1})
        report = run_driver("tests.test_multinode", address, cluster.dashboard_url,
                            str(tiny_dir), redis_url, marker=REPORT, timeout_s=420,
                            env=driver_env(cluster.env), logs=cluster.logs)
    finally:
        left = cluster.stop()
    assert left == [], f"processes of the cluster left running: {left}"
    print(f"two-node run: deploy {report['deploy_s']} s, all {report['total_s']} s; "
          f"click timings {report['segment']['timings_ms']}")

    [head], [model_node] = report["head"], report["model_node"]
    assert head != model_node
    replicas = report["replicas"]
    assert replicas["Gateway"] == [head], replicas
    for name in MODEL_DEPLOYMENTS:
        assert replicas[name] == [model_node], (name, replicas)
    assert report["gateway_node"] == head  # the response says so too
    assert report["segment"]["status"] == [200, 200, 200] and report["segment"]["masks"] == 3
    assert report["parse"]["status"] == 200, report["parse"]
    for job in ("edit", "mesh"):
        outcome = report[job]
        assert outcome["submit"] == 202 and outcome["status"] == "succeeded", (job, outcome)
        assert outcome["last_event"] == "succeeded", (job, outcome)
    assert report["mesh"]["glb"] == [200, "glTF"], report["mesh"]


if __name__ == "__main__":
    main(*sys.argv[1:5])
