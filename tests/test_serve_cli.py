"""`atelier3d serve` as a person runs it: starts Ray + the app, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.cluster


def test_serve_starts_and_stops_on_sigterm(tiny_dir):
    port = free_port()
    env = {**os.environ, "ATELIER3D_HOME": str(tiny_dir), "ATELIER3D_RAY_LOGS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atelier3d", "serve", "--models", "tiny", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert ready is not None and ready.status_code == 200, "server never became ready"
        assert ready.json()["weights"] == "untrained"
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200  # the UI
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "serving the UI and API on http://127.0.0.1:" in output
    assert "shutting down" in output
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.TransportError:
        pass
