"""Back-pressure and autoscaling of the click path, on a real local Ray.

The SamDecoder is made small on purpose (one request at a time, two queued, 1 to 2 replicas):
a burst of clicks past its queue gets 503 + Retry-After in our error shape (Ray Serve's
BackPressureError, configured by the YAML's backpressure_config), the client's retries get
every click through, a sustained load scales the decoder up, and it scales back down when the
load stops. The session's ``server`` fixture owns this process's Ray, so the cluster runs in a
subprocess (this module as a script) that prints its findings as one JSON line.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import free_port, print_report, run_driver

pytestmark = pytest.mark.cluster

REPORT = "BACKPRESSURE-REPORT "
RETRY_AFTER_S = 2
DECODER = {
    "name": "SamDecoder",
    "max_ongoing_requests": 1,
    "max_queued_requests": 2,
    "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                           "upscale_delay_s": 0.5, "downscale_delay_s": 4,
                           "metrics_interval_s": 0.5, "look_back_period_s": 2},
    "ray_actor_options": {"num_cpus": 0.5},
    "user_config": {"intra_op_threads": 1, "embedding_cache_size": 8},
}


def decoder_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["atelier3d"].deployments["SamDecoder"]
    return sum(n for state, n in deployment.replica_states.items()
               if getattr(state, "value", state) == "RUNNING")


def main(cache_dir: str) -> None:
    import httpx

    from atelier3d.clients import Client
    from atelier3d.samples import drawn_character
    from atelier3d.serve import runner

    port = free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": False,
        "limits": {"max_sessions_per_client": 1000}})
    deployments = config["applications"][0]["deployments"]
    deployments[:] = [d for d in deployments if d["name"] != "SamDecoder"] + [DECODER]
    runner.start(config, num_cpus=8)
    url = f"http://127.0.0.1:{port}"
    report: dict = {}
    try:
        with Client(url, timeout=120, retries=20, max_retry_delay_s=RETRY_AFTER_S) as client:
            session = client.create_session(drawn_character(), wait=True).session_id
            click = {"points": [[100, 150]], "labels": [1]}

            # 1. a burst without retries: some clicks are turned away, in our error shape
            def raw(_: int) -> tuple[int, str | None, dict | str]:
                r = httpx.post(f"{url}/v1/sessions/{session}/segment", json=click, timeout=120)
                is_json = r.headers.get("content-type", "").startswith("application/json")
                return r.status_code, r.headers.get("retry-after"), r.json() if is_json else r.text

            with ThreadPoolExecutor(16) as pool:
                burst = list(pool.map(raw, range(16)))
            refused = [(h, body) for status, h, body in burst if status == 503]
            report["burst"] = {"ok": sum(s == 200 for s, _, _ in burst), "503": len(refused),
                               "other": sorted({s for s, _, _ in burst} - {200, 503}),
                               "refused_sample": refused[:1]}

            # 2. the same burst through the client: its retries get every click through
            def retried(_: int) -> int:
                return len(client.segment(session, points=[(100, 150)]).masks)

            with ThreadPoolExecutor(16) as pool:
                report["retried_masks"] = list(pool.map(retried, range(16)))

            # 3. sustained load: the decoder scales up; then idle: it scales back down
            stop, peak = threading.Event(), [decoder_replicas()]

            def load() -> None:
                while not stop.is_set():
                    client.segment(session, points=[(100, 150)])

            workers = [threading.Thread(target=load) for _ in range(6)]
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and peak[0] < 2:
                time.sleep(0.5)
                peak[0] = max(peak[0], decoder_replicas())
            stop.set()
            for worker in workers:
                worker.join()
            report["peak_replicas"] = peak[0]
            started = time.monotonic()
            while decoder_replicas() > 1 and time.monotonic() - started < 90:
                time.sleep(1)
            report["replicas_after_idle"] = decoder_replicas()
            report["scale_down_s"] = round(time.monotonic() - started, 1)
    finally:
        print_report(REPORT, report)
        runner.stop()


def test_backpressure_retries_and_autoscaling(tiny_dir):
    report = run_driver("tests.test_backpressure", str(tiny_dir), marker=REPORT, timeout_s=600)

    burst = report["burst"]
    assert burst["other"] == [] and burst["ok"] >= 1 and burst["503"] >= 1, burst
    retry_after, body = burst["refused_sample"][0]
    assert retry_after == str(RETRY_AFTER_S)
    assert body["error"]["code"] == "unavailable" and "retry" in body["error"]["message"]
    assert report["retried_masks"] == [3] * 16  # every click answered, 3 candidates each
    assert report["peak_replicas"] == 2
    assert report["replicas_after_idle"] == 1


if __name__ == "__main__":
    main(sys.argv[1])
