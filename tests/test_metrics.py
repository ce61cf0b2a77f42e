"""Our ``ray_atelier_*`` metrics and Ray Serve's own, read from the Prometheus endpoint of the
test server's Ray after real traffic."""

from __future__ import annotations

import json
import time

import httpx

from atelier3d.samples import drawn_character
from tests.helpers import CUTOUT as IMAGE
from tests.helpers import png_bytes, uploaded


def scrape(url: str, wanted: list[str], timeout_s: float = 90.0) -> str:
    """The metrics text once every ``wanted`` piece shows (Ray's agent exports every few
    seconds)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        if all(piece in text for piece in wanted):
            return text
        time.sleep(2)
    missing = [piece for piece in wanted if piece not in text]
    raise AssertionError(f"metrics missing after {timeout_s}s: {missing}")


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        tags = line[line.index("{") + 1 : line.rindex("}")]
        if all(f'{key}="{value}"' in tags for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"no {name} sample with {labels}"
    return total


def test_stage_latency_cache_sessions_and_jobs_are_exported(http, metrics_url):
    job = http.post("/v1/jobs/mesh", files={"image": ("c.png", png_bytes(IMAGE))},
                    data={"request": json.dumps({"steps": 2, "octree_resolution": 64})})
    assert job.status_code == 202, job.text
    with http.stream("GET", f"/v1/jobs/{job.json()['job_id']}/events") as events:
        assert '"succeeded"' in "".join(events.iter_text())
    with uploaded(http, drawn_character()) as session_id:
        for x in (60, 90, 120):
            r = http.post(f"/v1/sessions/{session_id}/segment",
                          json={"points": [[x, 150]], "labels": [1]})
            assert r.status_code == 200
        text = scrape(metrics_url, [
            'ray_atelier_stage_latency_ms_bucket', 'stage="encode"', 'stage="decode"',
            "ray_atelier_embedding_cache_total", "ray_atelier_active_sessions",
            "ray_serve_num_http_requests", 'stage="mesh_denoise"', "ray_atelier_jobs",
        ])
    assert sample(text, "ray_atelier_stage_latency_ms_count", stage="decode") >= 3
    assert sample(text, "ray_atelier_stage_latency_ms_count", stage="encode") >= 1
    # the first click fetched the embedding, the next ones found it in the replica's cache
    assert sample(text, "ray_atelier_embedding_cache_total", result="hit") >= 2
    assert sample(text, "ray_atelier_embedding_cache_total", result="miss") >= 1
    assert sample(text, "ray_atelier_active_sessions") >= 1
    assert sample(text, "ray_atelier_stage_latency_ms_count", stage="mesh_denoise") >= 2
    assert sample(text, "ray_atelier_jobs", kind="mesh", state="running") >= 0
    assert 'deployment="SamDecoder"' in text  # Ray tags each sample with its replica's names
