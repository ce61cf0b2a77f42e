"""Character to 3D with Redis sessions, behind two Gateway replicas: the job runs to the end,
each result its stages made opens through either replica (the job's records and the parse,
edit and mesh they name), and a job resumed from it reuses them.

The app runs on a local Ray of its own in a subprocess (this module as a script; one Ray per
process), against the session's redis-server; it prints its findings as one JSON line.
"""

from __future__ import annotations

import json
import sys

import httpx
import pytest
import redis

from atelier3d.samples import drawn_character
from tests.helpers import free_port, png_bytes, print_report, run_driver
from tests.test_character_api import FAST, FIGURE_BOX, artifacts, glb_nodes, stage_order

pytestmark = pytest.mark.cluster

REPORT = "CHARACTER-REDIS-REPORT "
PREFIX = "chartest"
REPLICA = "x-atelier-replica"
READS = 6  # each read this many times: Serve spreads them over both replicas


def main(cache_dir: str, redis_url: str) -> None:
    from atelier3d.serve import runner  # Ray: slow to import, the driver's only

    port = free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": False,
        "limits": {"max_sessions_per_client": 1000},
        "sessions": {"backend": "redis", "redis_url": redis_url, "redis_prefix": PREFIX},
        # Each Gateway replica dispatches max_running: two of them stay within Shape3D's 3.
        "jobs": {"mesh": {"max_running": 1, "max_queued": 8}}})
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Gateway":
            deployment["num_replicas"] = 2
    runner.start(config, num_cpus=8)
    store = redis.Redis.from_url(redis_url)
    report: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            def reads(path: str) -> dict:
                """``path`` read ``READS`` times: statuses, distinct bodies, replicas."""
                got = [http.get(path) for _ in range(READS)]
                return {"status": sorted({r.status_code for r in got}),
                        "distinct": len({r.content for r in got}),
                        "replicas": sorted({r.headers.get(REPLICA, "?") for r in got}),
                        "body": got[0].content}

            def events(job_id: str) -> list[dict]:
                with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                    return [json.loads(line) for line in stream.iter_lines() if line.strip()]

            r = http.post("/v1/sessions?wait=true",
                          files={"image": ("c.png", png_bytes(drawn_character()))})
            sid = r.json()["session_id"]
            obj = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
            seg = http.post(f"/v1/sessions/{sid}/segment",
                            json={"box": FIGURE_BOX, "multimask": True, "object_id": obj})
            report["segment"], report["object_id"] = seg.status_code, obj
            parse = http.post(f"/v1/sessions/{sid}/parse", json={"object_id": obj}).json()
            hidden = [p for p in parse["parts"] if p["completed_url"] is not None
                      and p["name"] not in ("clothing", "hair", "body-skin")]
            garment = max(hidden, key=lambda p: p["bbox"][2] * p["bbox"][3])["name"]
            report["garment"] = garment

            r = http.post(f"/v1/sessions/{sid}/character3d",
                          json={"object_id": obj, "garments": [garment], **FAST})
            report["submit"], report["submit_replica"] = r.status_code, r.headers.get(REPLICA)
            job_id = r.json()["job_id"]
            seen = events(job_id)
            report["last_event"] = seen[-1]["type"]
            report["seqs_ok"] = [e["seq"] for e in seen] == list(range(len(seen)))
            report["stages"] = stage_order(seen)
            report["artifacts"] = list(artifacts(seen))
            state = reads(f"/v1/jobs/{job_id}")
            results = json.loads(state.pop("body"))["result_meta"]["results"]
            report["state"] = state

            # Each intermediate result: the job's own record of it, and what it names.
            report["artifact_reads"] = {}
            for name in report["artifacts"]:
                read = reads(f"/v1/jobs/{job_id}/result?artifact={name}")
                body = read.pop("body")
                read["results"] = json.loads(body)["results"] if read["status"] == [200] else None
                report["artifact_reads"][name] = read
            edit_id = results["completed"][garment]
            report["parse"] = reads(f"/v1/sessions/{sid}/parses/{results['parse_id']}")
            report["parse"]["object_id"] = json.loads(report["parse"].pop("body"))["object_id"]
            report["edit"] = reads(f"/v1/jobs/{edit_id}/result")
            report["edit"]["png"] = report["edit"].pop("body").startswith(b"\x89PNG")
            mesh_read = reads(f"/v1/jobs/{results['mesh_job_id']}/result")
            character_read = reads(f"/v1/jobs/{job_id}/result")
            report["mesh_same_as_character"] = mesh_read.pop("body") == character_read["body"]
            report["nodes"] = sorted(glb_nodes(character_read.pop("body")))
            report["mesh"], report["character"] = mesh_read, character_read
            report["job_keys"] = len(store.keys(f"{PREFIX}:job:{job_id}*"))

            # A job resumed from the checks: the parse and completion reused, through Redis
            # when the other replica takes it.
            r = http.post(f"/v1/sessions/{sid}/character3d", json={
                "object_id": obj, "garments": [garment], **FAST, "resume_from": "checks",
                "previous_job_id": job_id})
            report["resume_submit"] = r.status_code
            report["resume_replica"] = r.headers.get(REPLICA)  # the same one or the other
            resumed_id = r.json()["job_id"]
            resumed = events(resumed_id)
            report["resume_last_event"] = resumed[-1]
            after = http.get(f"/v1/jobs/{resumed_id}").json()["result_meta"]["results"]
            report["resume_reused"] = all(after[k] == results[k]
                                          for k in ("parse_id", "completed", "checks_parse_id"))
            report["resume_nodes"] = sorted(glb_nodes(
                http.get(f"/v1/jobs/{resumed_id}/result").content))
            report["expected_results"] = results
    finally:
        print_report(REPORT, report)
        runner.stop()


def test_character_job_with_redis_sessions_on_two_gateway_replicas(tiny_dir, redis_url):
    report = run_driver("tests.test_character_redis", str(tiny_dir), redis_url, marker=REPORT,
                        timeout_s=900)
    print(report)  # shown with -s
    garment = report["garment"]
    assert report["segment"] == 200 and report["submit"] == 202
    assert report["last_event"] == "succeeded" and report["seqs_ok"]
    assert report["stages"] == ["parse", "complete", "t_pose", "checks", "mesh"]
    assert report["artifacts"] == ["parse", f"complete.{garment}", "t_pose", "checks", "mesh"]
    assert report["state"]["status"] == [200]
    # Every intermediate result opens through either replica, the same each time.
    reads = [report["state"], report["parse"], report["edit"], report["mesh"],
             report["character"], *report["artifact_reads"].values()]
    for read in reads:
        assert read["status"] == [200] and read["distinct"] == 1, read
    assert len({r for read in reads for r in read["replicas"]}) == 2, reads
    # Each stage's record holds what was made so far; the last holds it all.
    assert report["artifact_reads"]["mesh"]["results"] == report["expected_results"]
    assert report["artifact_reads"]["parse"]["results"]["parse_id"] == \
        report["expected_results"]["parse_id"]
    assert report["parse"]["object_id"] == report["object_id"] and report["edit"]["png"]
    assert report["mesh_same_as_character"] and {"body", garment} <= set(report["nodes"])
    assert report["job_keys"] > 0  # the job's records are Redis's
    assert report["resume_submit"] == 202
    assert report["resume_last_event"]["type"] == "succeeded", report["resume_last_event"]
    assert report["resume_reused"] and {"body", garment} <= set(report["resume_nodes"])


if __name__ == "__main__":
    main(*sys.argv[1:])
