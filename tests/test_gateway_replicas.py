"""Two Gateway replicas with Redis sessions, behind Serve's proxy: one session's requests land on
both replicas (``X-Atelier-Replica`` says which) and every answer is the same as with one.

upload → an object → many clicks → undo → redo → refine → cutout → parse → a mesh job (status,
events and result read through whichever replica) → an idle session expires (TTL in Redis) →
delete. The app runs on a local Ray of its own in a subprocess (this module as a script; one Ray
per process), against the session's redis-server; it prints its findings as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter

import pytest

from tests.helpers import free_port, png_bytes, print_report, run_driver

pytestmark = pytest.mark.cluster

REPORT = "REPLICAS-REPORT "
TTL_S = 12
PREFIX = "gwtest"
CLICKS = [(60 + 7 * i, 80 + 11 * i) for i in range(12)]
REPLICA = "x-atelier-replica"


def main(cache_dir: str, redis_url: str) -> None:
    import httpx
    import redis

    from atelier3d.samples import drawn_character
    from atelier3d.serve import runner

    port = free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": False,
        "limits": {"max_sessions_per_client": 1000},
        "sessions": {"backend": "redis", "redis_url": redis_url, "redis_prefix": PREFIX,
                     "ttl_s": TTL_S},
        # Each Gateway replica dispatches max_running: two of them stay within Shape3D's 3.
        "jobs": {"mesh": {"max_running": 1, "max_queued": 32}}})
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Gateway":
            deployment["num_replicas"] = 2
    runner.start(config, num_cpus=8)
    url = f"http://127.0.0.1:{port}"
    store = redis.Redis.from_url(redis_url)
    report: dict = {"served_by": Counter()}
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            def call(method: str, path: str, **kw) -> httpx.Response:
                r = http.request(method, path, **kw)
                report["served_by"][r.headers.get(REPLICA, "?")] += 1
                return r

            image = drawn_character(200, 256)
            idle = call("POST", "/v1/sessions?wait=true",
                        files={"image": ("i.png", png_bytes(image))}).json()["session_id"]
            idle_since = time.monotonic()
            r = call("POST", "/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(image))})
            sid = r.json()["session_id"]
            obj = call("POST", f"/v1/sessions/{sid}/objects").json()["object_id"]

            clicks = []
            for i, (x, y) in enumerate(CLICKS):
                points = [[x, y], [20, 20]] if i % 3 == 2 else [[x, y]]
                labels = [1, 0] if i % 3 == 2 else [1]
                r = call("POST", f"/v1/sessions/{sid}/segment",
                         json={"points": points, "labels": labels, "object_id": obj})
                body = r.json()
                clicks.append({"status": r.status_code, "step": body.get("step"),
                               "replica": r.headers.get(REPLICA), "masks": body.get("masks"),
                               "selected": body.get("selected")})
            report["click_steps"] = [c["step"] for c in clicks]
            report["click_replicas"] = sorted({c["replica"] for c in clicks})

            def states(n: int = 6) -> list[dict]:
                return [call("GET", f"/v1/sessions/{sid}/objects/{obj}").json() for _ in range(n)]

            def agrees(state_list: list[dict], click: dict, step: int) -> bool:
                return all(s["step"] == step and s["masks"] == click["masks"]
                           and s["selected"] == click["selected"] for s in state_list)

            report["after_clicks"] = agrees(states(), clicks[-1], len(CLICKS))
            undo = call("POST", f"/v1/sessions/{sid}/objects/{obj}/undo").json()
            report["undo"] = (undo["step"] == len(CLICKS) - 1
                              and agrees(states(), clicks[-2], len(CLICKS) - 1))
            redo = call("POST", f"/v1/sessions/{sid}/objects/{obj}/redo").json()
            report["redo"] = redo["step"] == len(CLICKS) and agrees(states(), clicks[-1],
                                                                      len(CLICKS))
            r = call("POST", f"/v1/sessions/{sid}/segment",
                     json={"points": [[100, 140]], "labels": [1], "refine": True,
                           "object_id": obj})
            refined = {"masks": r.json().get("masks"), "selected": r.json().get("selected")}
            report["refine"] = {"status": r.status_code, "step": r.json().get("step"),
                                "agrees": agrees(states(), refined, len(CLICKS) + 1)}

            cutouts = [call("POST", f"/v1/sessions/{sid}/cutout",
                            json={"object_id": obj, "background": "transparent"})
                       for _ in range(6)]
            report["cutout"] = {"status": sorted({r.status_code for r in cutouts}),
                                "distinct": len({hashlib.sha256(r.content).hexdigest()
                                                 for r in cutouts}),
                                "replicas": len({r.headers.get(REPLICA) for r in cutouts})}

            r = call("POST", f"/v1/sessions/{sid}/parse", json={"object_id": obj})
            parse = r.json()
            report["parse_status"] = r.status_code
            again = [call("GET", f"/v1/sessions/{sid}/parses/{parse['parse_id']}")
                     for _ in range(6)]
            maps = [call("GET", parse["parse_map_url"]) for _ in range(6)]
            report["parse"] = {"same": all(a.json() == parse for a in again),
                               "replicas": len({a.headers.get(REPLICA) for a in again + maps}),
                               "maps": len({m.content for m in maps}),
                               "map_status": sorted({m.status_code for m in maps})}

            r = call("POST", "/v1/jobs/mesh", json={
                "session_id": sid, "source": {"kind": "object", "object_id": obj},
                "steps": 2, "octree_resolution": 64, "seed": 1})
            job_id = r.json()["job_id"]
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                events = [json.loads(line) for line in stream.iter_lines() if line.strip()]
            statuses = [call("GET", f"/v1/jobs/{job_id}") for _ in range(6)]
            results = [call("GET", f"/v1/jobs/{job_id}/result") for _ in range(6)]
            report["mesh"] = {
                "submit": r.status_code, "last_event": events[-1]["type"] if events else None,
                "seqs_ok": [e["seq"] for e in events] == list(range(len(events))),
                "statuses": sorted({s.json()["status"] for s in statuses}),
                "results": sorted({r.status_code for r in results}),
                "distinct_results": len({r.content for r in results}),
                "replicas": len({r.headers.get(REPLICA) for r in statuses + results})}

            # the idle session: gone after its TTL, on every replica and in Redis
            time.sleep(max(0.0, TTL_S + 1.5 - (time.monotonic() - idle_since)))
            gone = [call("GET", f"/v1/sessions/{idle}").status_code for _ in range(4)]
            report["expired"] = {"status": sorted(set(gone)),
                                 "keys": len(store.keys(f"{PREFIX}:s:{{{idle}}}*"))}
            report["live_ttl_ms"] = store.pttl(f"{PREFIX}:s:{{{sid}}}")

            deleted = call("DELETE", f"/v1/sessions/{sid}").status_code
            after = [call("GET", f"/v1/sessions/{sid}").status_code for _ in range(4)]
            after.append(call("GET", f"/v1/jobs/{job_id}").status_code)
            report["deleted"] = {"status": deleted, "after": sorted(set(after)),
                                 "keys": len(store.keys(f"{PREFIX}:s:{{{sid}}}*")),
                                 "job_keys": len(store.keys(f"{PREFIX}:job:{job_id}*"))}
    finally:
        report["served_by"] = dict(report["served_by"])
        print_report(REPORT, report)
        runner.stop()


def test_two_gateway_replicas_share_sessions_through_redis(tiny_dir, redis_url):
    report = run_driver("tests.test_gateway_replicas", str(tiny_dir), redis_url, marker=REPORT,
                        timeout_s=420)

    # Both replicas served this session's requests, clicks included.
    assert len(report["served_by"]) == 2 and "?" not in report["served_by"], report
    assert len(report["click_replicas"]) == 2, report
    # No click lost or reordered (each is one step, under the session's lock), and every
    # replica answers the same state after clicks, undo and redo.
    assert report["click_steps"] == list(range(1, len(CLICKS) + 1)), report
    assert report["after_clicks"] and report["undo"] and report["redo"], report
    # refining reads the selected step's logits (float16 in Redis) wherever the click lands
    assert report["refine"] == {"status": 200, "step": len(CLICKS) + 1, "agrees": True}, report
    assert report["cutout"]["status"] == [200] and report["cutout"]["distinct"] == 1, report
    assert report["parse_status"] == 200 and report["parse"]["same"], report
    assert report["parse"]["maps"] == 1 and report["parse"]["map_status"] == [200], report
    mesh = report["mesh"]
    assert mesh["submit"] == 202 and mesh["last_event"] == "succeeded" and mesh["seqs_ok"], mesh
    assert mesh["statuses"] == ["succeeded"] and mesh["results"] == [200], mesh
    assert mesh["distinct_results"] == 1, mesh
    assert report["expired"] == {"status": [404], "keys": 0}, report
    assert 0 < report["live_ttl_ms"] <= TTL_S * 1000, report
    assert report["deleted"] == {"status": 204, "after": [404], "keys": 0, "job_keys": 0}, report


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
