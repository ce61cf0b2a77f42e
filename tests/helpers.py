"""What several test modules share (test modules import this, never each other or conftest):
where tiny checkpoints are cached, images and uploads, the API's error shape, a blocking job
'pipeline', and running a scenario in a subprocess of its own.

Ports and PNG encoding are the benchmarks' (``benchmarks.common``): one definition for both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import numpy as np

from atelier3d.deployments.streaming import stream_blocking
from atelier3d.errors import BadRequest
from benchmarks.common import free_port, png_bytes

__all__ = [
    "CUTOUT", "GENERATED", "MODEL_DEPLOYMENTS", "ROOT", "StepWork", "TWO_NODE_CONFIG",
    "assert_error", "cutout", "driver_env", "end_driver", "free_port", "png_bytes",
    "print_report", "replica_nodes", "run_driver", "uploaded",
]

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "tests" / "fixtures" / ".generated"  # tiny checkpoints, git-ignored
# The app's deployments that run a model (all but the Gateway), and the profile that puts them
# on a node of their own.
MODEL_DEPLOYMENTS = ["SamEncoder", "SamDecoder", "HumanParser", "ImageEditor", "Shape3D"]
TWO_NODE_CONFIG = ROOT / "atelier3d" / "serve" / "configs" / "two-node.yaml"


# ---- images, uploads, errors -------------------------------------------------------------------


def cutout(h: int = 160, w: int = 128, box: tuple[int, int, int, int] = (30, 20, 100, 140),
           color: tuple[int, int, int] = (200, 60, 40)) -> np.ndarray:
    """An RGBA cut-out: a two-coloured box on a transparent background (what meshing takes)."""
    rgba = np.zeros((h, w, 4), np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1] = (*color, 255)
    rgba[y0:(y0 + y1) // 2, x0:x1, :3] = (40, 160, 220)  # the top half another colour
    return rgba


CUTOUT = cutout()


@contextlib.contextmanager
def uploaded(http: httpx.Client, image: np.ndarray) -> Iterator[str]:
    """A session for ``image`` (encoded: ``?wait=true``), deleted afterwards; yields its id."""
    r = http.post("/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(image))})
    assert r.status_code == 201, r.text
    yield r.json()["session_id"]
    http.delete(f"/v1/sessions/{r.json()['session_id']}")


def assert_error(response, status: int, code: str | None = None) -> dict:
    """``response`` is the API's error shape with ``status`` (and ``code``); returns the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


# ---- jobs --------------------------------------------------------------------------------------


class StepWork:
    """A blocking 'pipeline': ``steps`` steps of ``step_s`` seconds, reporting each; it records
    how many steps ran and refuses to run two calls at once (like a pipeline object)."""

    def __init__(self, steps: int = 4, step_s: float = 0.05) -> None:
        self.steps, self.step_s = steps, step_s
        self.lock = threading.Lock()
        self.ran: dict[str, int] = {}
        self.inside = 0

    def start(self, request: dict):
        def work(reporter):
            self.inside += 1
            try:
                assert self.inside == 1, "two calls on one pipeline object at once"
                if request.get("fail"):
                    raise BadRequest("this input cannot be edited")
                for i in range(self.steps):
                    time.sleep(self.step_s)
                    self.ran[request["name"]] = i + 1
                    reporter.report("denoise", i + 1, self.steps)
                return {"media_type": "text/plain", "data": request["name"].encode(), "meta": {}}
            finally:
                self.inside -= 1

        return stream_blocking(work, self.lock)


# ---- scenarios in a subprocess -----------------------------------------------------------------
# One process holds one Ray, and the session's ``server`` fixture owns this one's: a scenario
# that needs a Ray (or a cluster) of its own runs as a driver, a test module run as a script
# (``python -m tests.test_x ARGS``), which prints its findings as one JSON line after a marker.


def driver_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a driver: ``base`` (this process's by default) without a Ray address
    (it starts or joins its own), Ray's logs quiet, this checkout's ``atelier3d`` first."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "RAY_ADDRESS"}
    return env | {"ATELIER3D_RAY_LOGS": "0", "PYTHONPATH": str(ROOT)} | extra


def run_driver(module: str, *args: str, marker: str, timeout_s: float,
               env: Mapping[str, str] | None = None,
               logs: Callable[[], str] | None = None) -> dict:
    """Runs ``python -m module args`` from the repository root, with ``env`` (``driver_env()``
    by default), and returns the report it printed after ``marker``. It must have printed one
    and exited 0; otherwise the assertion shows its output's tail (and ``logs()``, if given)."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=driver_env() if env is None else dict(env),
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    assert lines, done.stdout[-3000:] + done.stderr[-5000:] + (logs() if logs else "")
    report = json.loads(lines[-1][len(marker):])
    assert done.returncode == 0, (report, done.stderr[-5000:])
    return report


def print_report(marker: str, report: dict) -> None:
    """In a driver: its findings, as the one line ``run_driver`` reads."""
    print(marker + json.dumps(report), flush=True)


def replica_nodes(dashboard_url: str) -> dict[str, list[str]]:
    """Deployment -> node ids of its live replicas, from Ray's state API (the dashboard)."""
    from ray.util.state import list_actors  # slow to import; cluster drivers only

    nodes: dict[str, list[str]] = {}
    for actor in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")],
                             limit=1000):
        if actor.class_name.startswith("ServeReplica:atelier3d:"):
            nodes.setdefault(actor.class_name.rsplit(":", 1)[1], []).append(actor.node_id)
    return nodes


def end_driver(marker: str, report: dict) -> None:
    """In a driver that joined a cluster: prints its report (also when it stopped half-way),
    then shuts Serve down and lets go of the cluster."""
    # Imported here: Ray is slow to import, and only cluster drivers need it.
    import ray
    from ray import serve

    print_report(marker, report)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# ---- edits -----------------------------------------------------------------------------------

PROMPT = "make the shirt red"
SIZE = 64
# lightx2v's scheduler for its LoRAs (Qwen-Image-Lightning's generate_with_diffusers.py), written
# out here rather than imported, so the served schedule is checked against the published one.
PUBLISHED_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False,
    "max_image_seq_len": 8192, "max_shift": math.log(3), "num_train_timesteps": 1000,
    "shift": 1.0, "shift_terminal": None, "stochastic_sampling": False,
    "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": True,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def direct(pipe_dir, lora_dir, weight_name: str, images: list[np.ndarray], steps: int,
           lora: bool = True, prompt: str = PROMPT, size: int | None = SIZE, seed: int = 5,
           negative_prompt: str = " ", mask: np.ndarray | None = None) -> np.ndarray:
    """The edit with diffusers alone: the pipeline, the published scheduler, load_lora_weights,
    no CFG (as Lightning runs). With ``mask``, QwenImageEditInpaintPipeline repaints that region
    from noise (strength 1) at the image's own size."""
    # diffusers and torch load here: most tests that import this module never edit
    import torch
    from diffusers import (
        DiffusionPipeline,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditInpaintPipeline,
    )
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(PUBLISHED_SCHEDULER)
    if lora:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    pil = [Image.fromarray(i) for i in images]
    inputs = dict(image=pil if len(pil) > 1 else pil[0], prompt=prompt,
                  negative_prompt=negative_prompt, true_cfg_scale=1.0, num_inference_steps=steps,
                  generator=torch.Generator("cpu").manual_seed(seed))
    if mask is not None:
        pipe = QwenImageEditInpaintPipeline(**pipe.components)
        inputs |= dict(mask_image=Image.fromarray(mask.astype(np.uint8) * 255), strength=1.0)
    else:
        inputs |= dict(width=size, height=size)
    return np.asarray(pipe(**inputs).images[0])


@contextlib.contextmanager
def one_thread():
    """The replica's torch threads: the same sums in the same order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """An RGBA cut-out composited on white, as the editor takes it."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
