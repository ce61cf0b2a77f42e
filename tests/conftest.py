"""Shared fixtures: tiny checkpoints (generated once, cached in an ignored dir) and one real
Ray Serve deployment of the whole app for the test session."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import GENERATED, free_port


@contextlib.contextmanager
def redis_server(*options: str):
    """A real ``redis-server`` (Debian's; ``make test-deps`` installs it) on a free port, in a
    temporary directory, persisting nothing, with ``options`` added (``--requirepass X``);
    stopped afterwards. Yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test-deps` (apt-get install "
                    "redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="a3d-redis-") as directory:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
             "--save", "", "--appendonly", "no", "--protected-mode", "yes", *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up, password or not
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit {proc.poll()})")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """One redis-server for the test session (tests use key prefixes of their own)."""
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Tiny SAM, SegFormer, Qwen-Image-Edit and Hunyuan3D checkpoints, and BlazePose's real
    models (no tiny ones exist; fetched once from the mediapipe wheel), so no server replica
    writes or downloads any."""
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir
    from atelier3d.models.mesh.hunyuan3d import tiny_shape3d_dir
    from atelier3d.models.parse.pose import resolve_pose_weights
    from atelier3d.models.parse.segformer import tiny_segformer_dir
    from atelier3d.models.segment.sam import tiny_checkpoint

    tiny_checkpoint(GENERATED)
    tiny_segformer_dir(GENERATED)
    tiny_edit_dir(GENERATED)
    tiny_edit_dir(GENERATED, plus=True)
    tiny_lightning_dir(GENERATED)
    tiny_shape3d_dir(GENERATED)
    resolve_pose_weights(cache_dir=GENERATED)
    return GENERATED


@pytest.fixture(scope="session")
def tiny_sam(tiny_dir):
    from atelier3d.models.segment.sam import tiny_checkpoint

    return tiny_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def human_parser(tiny_dir):
    """The HumanParser deployment's class in-process, configured as the ``server``'s."""
    from atelier3d.deployments.parse import HumanParser

    return HumanParser.func_or_class({"models": "tiny", "cache_dir": str(tiny_dir)})


@pytest.fixture(scope="session")
def metrics_url() -> str:
    """Where the ``server``'s Ray exports Prometheus metrics."""
    return f"http://127.0.0.1:{free_port()}/metrics"


@pytest.fixture(scope="session")
def server(tiny_dir, metrics_url) -> str:
    """The whole app (Gateway + UI, SamEncoder, SamDecoder, HumanParser, ImageEditor with the
    Lightning LoRA, Shape3D) on a local Ray, tiny weights."""
    from atelier3d.serve import runner

    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    port = free_port()
    config = runner.load_serve_config(
        models="tiny",
        port=port,
        args_override={
            "cache_dir": str(tiny_dir),
            # ATELIER3D_TEST_UI=0 leaves Gradio out, for quicker runs of the API tests alone.
            "ui": os.environ.get("ATELIER3D_TEST_UI", "1") == "1",
            # Small so tests reach the limits; two resident embeddings so eviction is exercised.
            "limits": {"max_upload_bytes": 2_000_000, "max_pixels": 4_000_000, "max_points": 16,
                       "max_sessions_per_client": 1000},
            "sessions": {"max_resident_embeddings": 2},
            # Two Shape3D replicas (below): mesh jobs run two at a time.
            "jobs": {"mesh": {"max_running": 2, "max_queued": 8}},
            # The config's fair-use limits, with the tests' own address exempt: the fair-use
            # tests name other clients through X-Forwarded-For.
            "fair_use": {"trust_forwarded_for": True, "exempt": ["127.0.0.1"]},
            # The 8-step Lightning LoRA, as the GPU runs use it (its tiny stand-in here).
            "edit": {"lightning_lora": {}},
        },
    )
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Shape3D":
            deployment["num_replicas"] = 2
    runner.start(config, metrics_port=int(metrics_url.rsplit(":", 1)[1].split("/")[0]))
    yield f"http://127.0.0.1:{port}"
    runner.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client
