"""`atelier3d serve` as a person runs it: starts Ray + the app, serves, and on SIGTERM stops
within 10 s, an edit still running, leaving no process of its Ray cluster behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest

from atelier3d.serve import runner
from tests.helpers import free_port, png_bytes

pytestmark = pytest.mark.cluster

STOP_WITHIN_S = 10.0


def wait_ready(proc: subprocess.Popen, base: str) -> httpx.Response:
    deadline = time.monotonic() + 300
    ready = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(f"{base}/readyz", timeout=5)
            if ready.status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    assert ready is not None and ready.status_code == 200, "server never became ready"
    return ready


def start_long_edit(base: str) -> str:
    """An edit job that runs for a while on the tiny editor (100 steps at 768x768), running
    when this returns: what made the old stop wait for the ImageEditor's 20 s drain."""
    with httpx.Client(base_url=base, timeout=120) as http:
        image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
        r = http.post("/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(image))})
        assert r.status_code == 201, r.text
        r = http.post("/v1/jobs/edit", json={"session_id": r.json()["session_id"],
                                             "prompt": "red", "steps": 100,
                                             "width": 768, "height": 768})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 120
        while (status := http.get(f"/v1/jobs/{job_id}").json()["status"]) == "queued":
            assert time.monotonic() < deadline, "the edit never started"
            time.sleep(0.2)
        assert status == "running", status
        return job_id


def ray_session_dir(processes: list[psutil.Process]) -> str:
    """The temp dir of the Ray session these processes belong to (from the raylet's arguments)."""
    for process in processes:
        try:
            match = re.search(r"--session[-_]dir=(\S+)", " ".join(process.cmdline()))
        except psutil.Error:
            continue
        if match:
            return match.group(1)
    raise AssertionError(f"no raylet among {[p.name() for p in processes]}")


def running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def session_processes(session_dir: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if session_dir in cmdline:
            found.append(f"{process.info['pid']} {cmdline[:120]}")
    return found


def test_serve_starts_and_stops_on_sigterm(tiny_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = runner.packaged_config_path("local.yaml")
    env = {**os.environ, "ATELIER3D_HOME": str(tiny_dir), "ATELIER3D_RAY_LOGS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atelier3d", "serve", "--config", str(config), "--models", "tiny",
         "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ray_processes: list[psutil.Process] = []
    try:
        ready = wait_ready(proc, base)
        assert ready.json()["weights"] == "untrained"
        assert httpx.get(f"{base}/", timeout=30).status_code == 200  # the UI
        start_long_edit(base)
        # Ray's processes are this one's descendants: GCS, raylet, and the raylet's workers
        # (the controller, the proxy, every replica).
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        session_dir = ray_session_dir(ray_processes)
        assert len(ray_processes) >= 8, [p.name() for p in ray_processes]

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        exited_s = time.monotonic() - signalled
        print(f"exited {exited_s:.1f} s after SIGTERM")
        while running(ray_processes) and time.monotonic() - signalled < STOP_WITHIN_S:
            time.sleep(0.1)
        left = running(ray_processes) + session_processes(session_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
        for process in ray_processes:  # never leave a cluster behind, even when failing
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode == 0, output
    assert f"config {config}: given by --config" in output
    assert "serving the UI and API on http://127.0.0.1:" in output
    assert "shutting down" in output
    assert exited_s < STOP_WITHIN_S, f"exited {exited_s:.1f} s after SIGTERM\n{output}"
    assert not left, f"left running after SIGTERM: {left}"
    try:
        httpx.get(f"{base}/healthz", timeout=3)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.TransportError:
        pass
