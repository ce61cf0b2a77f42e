"""The image's smoke test (k8s/build_and_smoke.sh runs it inside a container of the image):
tiny checkpoints written with ``atelier3d models make-tiny``, ``atelier3d serve --models tiny``
started on them, ``/readyz`` green with every model deployment, then a SIGTERM that must stop
the server. Standard library only; prints one JSON line and exits non-zero on any failure.

    ATELIER3D_HOME=/tmp/atelier3d python k8s/smoke.py [--port 8000] [--timeout-s 900]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODELS = {"sam_encoder", "sam_decoder", "human_parser", "image_editor", "shape3d"}
STOP_S = 30.0


def readyz(port: int) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=15) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None  # not listening yet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    home = Path(os.environ.setdefault("ATELIER3D_HOME", "/tmp/atelier3d"))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "atelier3d", "models", "make-tiny", "--dir",
                    str(home)], check=True)
    made = time.monotonic() - started
    server = subprocess.Popen([sys.executable, "-m", "atelier3d", "serve", "--models", "tiny",
                               "--port", str(args.port)], start_new_session=True)
    report: dict = {"make_tiny_s": round(made, 1)}
    try:
        deadline = time.monotonic() + args.timeout_s
        status, body = 0, None
        while time.monotonic() < deadline and server.poll() is None:
            status, body = readyz(args.port)
            if status == 200:
                break
            time.sleep(2)
        report |= {"readyz_status": status, "ready_after_s": round(time.monotonic() - started, 1),
                   "models": sorted((body or {}).get("models", {}))}
        ok = status == 200 and body is not None and body.get("ready") is True and set(
            body.get("models", {})) == MODELS
        stop = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_S)
        except subprocess.TimeoutExpired:
            ok = False
        report |= {"stopped_after_s": round(time.monotonic() - stop, 1),
                   "exit_code": server.poll()}
        ok = ok and server.returncode == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    print(json.dumps(report | {"ok": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
