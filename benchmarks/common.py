"""What the benchmarks share (and the tests too: ``free_port``, ``png_bytes``): the repository's
paths, loopback ports, PNG encoding, latency percentiles and a description of the machine.

Light on purpose (numpy and Pillow only): tests import it, and so do Serve drivers.
"""

from __future__ import annotations

import io
import os
import platform
import re
import socket
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "bench"  # random checkpoints and ONNX files, git-ignored
RESULTS_DIR = REPO / "benchmarks" / "results"
LOOPBACK = "127.0.0.1"  # every benchmark server listens here only
REPLICA = re.compile(r"ServeReplica:atelier3d:(\w+)")  # a Serve replica's actor class


def free_port() -> int:
    """A TCP port free on the loopback address now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """``image`` encoded as a file (PNG unless ``fmt`` names another Pillow format)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def percentiles(values: list[float]) -> dict:
    """Count, p50/p95/p99, mean, min and max of ``values`` (``{"n": 0}`` when there are none)."""
    if len(values) == 0:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": int(arr.size), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    """The machine and library versions a result was measured with."""
    # Imported here: heavy, and only the benchmarks that record the machine need them (tests
    # and Serve drivers import this module too).
    import onnxruntime
    import ray
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": False, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "ray": ray.__version__,
            "load_average_start": load_average()}


def replica_pids() -> dict[str, list[int]]:
    """Deployment -> pids of its live replicas in the Ray this process is connected to (from its
    GCS actor table: other Ray clusters on the machine run processes of the same name)."""
    import ray  # heavy, and only the benchmarks that start Serve need it

    out: dict[str, list[int]] = {}
    for actor in ray._private.state.actors().values():
        match = REPLICA.fullmatch(actor["ActorClassName"])
        if match is not None and actor["State"] == "ALIVE":
            out.setdefault(match.group(1), []).append(actor["Pid"])
    return out
