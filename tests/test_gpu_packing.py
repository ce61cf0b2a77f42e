"""Fractional GPU packing: gpu-80g.yaml's replicas placed on one GPU by their fractions.

The GPU is logical (``ray.init(num_gpus=1)``) and every model falls back to the CPU (no CUDA
here), so this checks Ray's placement, not memory: all replicas run and the GPU left is
1 - their fractions; a fraction that cannot fit leaves its deployment pending while the others
run, and /readyz names it. The session's ``server`` fixture owns this process's Ray, and one
process holds one Ray: the cluster runs in a subprocess (this module run as a script), which
prints its findings as one JSON line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest
import yaml

from tests.helpers import ROOT, driver_env, free_port, print_report, run_driver

pytestmark = pytest.mark.cluster

CONFIG = ROOT / "atelier3d" / "serve" / "configs" / "gpu-80g.yaml"
REPORT = "PACKING-REPORT "
# Shape3D asks for 0.9 of the card in the second case: it cannot fit beside the others.
PENDING, PENDING_FRACTION = "Shape3D", 0.9


def gpu_asks(config: dict) -> dict[str, tuple[int, float]]:
    """Deployment name -> (replicas, GPU fraction per replica)."""
    deployments = config["applications"][0]["deployments"]
    return {d["name"]: (d["num_replicas"], d["ray_actor_options"]["num_gpus"])
            for d in deployments}


def cpu_ask(name: str) -> float:
    deployments = yaml.safe_load(CONFIG.read_text())["applications"][0]["deployments"]
    return next(d for d in deployments if d["name"] == name)["ray_actor_options"]["num_cpus"]


def _replicas() -> dict[str, dict]:
    from ray import serve

    deployments = serve.status().applications["atelier3d"].deployments
    return {name: {"status": getattr(d.status, "value", d.status),
                   "running": sum(n for s, n in d.replica_states.items()
                                  if getattr(s, "value", s) == "RUNNING"),
                   "message": d.message}
            for name, d in deployments.items()}


def _available(gpu: float, wait_s: float = 10.0) -> dict[str, float]:
    """Ray's available CPU and GPU, once the GPU reads ``gpu`` (the raylet reports usage to the
    GCS asynchronously, and a stopping replica frees its share late) or after ``wait_s``."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        available = ray.available_resources()
        left = {"CPU": available.get("CPU", 0.0), "GPU": available.get("GPU", 0.0)}
        if abs(left["GPU"] - gpu) < 1e-6 or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _readyz(port: int) -> dict:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
    return {"status": r.status_code, "body": r.json()}


def main(cache_dir: str) -> None:
    from atelier3d.serve import runner

    port = free_port()
    config = runner.load_serve_config(
        CONFIG, models="tiny", port=port,
        args_override={
            "cache_dir": cache_dir,
            "ui": False,
            # bitsandbytes needs a real CUDA device (diffusers refuses it without one); the
            # models run on the CPU here, the GPU only steers placement.
            "edit": {"text_encoder_quantization": "none"},
        },
    )
    asks = gpu_asks(config)
    report: dict = {}
    runner.init_ray(num_cpus=8, num_gpus=1)
    try:
        start = time.monotonic()
        runner.deploy(config, timeout_s=150)
        report["packed"] = {
            "deploy_s": time.monotonic() - start,
            "replicas": _replicas(),
            "available": _available(1 - sum(n * f for n, f in asks.values())),
            "readyz": _readyz(port),
        }

        for deployment in config["applications"][0]["deployments"]:
            if deployment["name"] == PENDING:
                deployment["ray_actor_options"]["num_gpus"] = PENDING_FRACTION
        # deploy() returns once every application runs, which this one never does: submit it,
        # then watch the replicas here.
        with contextlib.suppress(TimeoutError):
            runner.deploy(config, timeout_s=0)
        deadline = time.monotonic() + 60
        while True:
            replicas = _replicas()
            others_run = all(r["running"] for name, r in replicas.items() if name != PENDING)
            unscheduled = "to be scheduled" in replicas[PENDING]["message"]
            if (others_run and not replicas[PENDING]["running"] and unscheduled
                    or time.monotonic() > deadline):
                break
            time.sleep(0.5)
        others = sum(n * f for name, (n, f) in asks.items() if name != PENDING)
        report["pending"] = {"replicas": replicas, "readyz": _readyz(port),
                             "available": _available(1 - others)}
    finally:
        print_report(REPORT, report)
        runner.stop()


def test_gpu_fractions_pack_on_one_card(tiny_dir):
    # A Ray of its own (driver_env drops RAY_ADDRESS), not on a metrics port set here.
    env = {k: v for k, v in os.environ.items() if k != "ATELIER3D_METRICS_PORT"}
    # Serve names a replica's resource ask in its status once it has waited this long to be
    # scheduled (30 s by default): 1 s keeps the test short.
    env = driver_env(env, RAY_SERVE_SLOW_STARTUP_WARNING_S="1",
                     RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S="1")
    report = run_driver("tests.test_gpu_packing", str(tiny_dir), marker=REPORT, timeout_s=175,
                        env=env)
    asks = gpu_asks(yaml.safe_load(CONFIG.read_text()))

    packed = report["packed"]
    for name, (replicas, _) in asks.items():
        assert packed["replicas"][name]["running"] == replicas, (name, packed["replicas"][name])
    used = sum(n * f for n, f in asks.values())
    assert abs(packed["available"]["GPU"] - (1 - used)) < 1e-6, (packed["available"], used)
    assert packed["readyz"]["status"] == 200, packed["readyz"]
    assert packed["readyz"]["body"]["ready"] is True

    pending = report["pending"]
    assert pending["replicas"][PENDING]["running"] == 0, pending["replicas"][PENDING]
    for name, (replicas, _) in asks.items():
        if name != PENDING:
            assert pending["replicas"][name]["running"] == replicas, (name, pending["replicas"])
    # The others keep their share; the pending replica holds none, and waits for the GPU alone.
    others = sum(n * f for name, (n, f) in asks.items() if name != PENDING)
    assert abs(pending["available"]["GPU"] - (1 - others)) < 1e-6, (pending["available"], others)
    assert pending["available"]["CPU"] >= cpu_ask(PENDING), pending["available"]
    assert pending["readyz"]["status"] == 503, pending["readyz"]
    message = pending["readyz"]["body"]["error"]["message"]
    assert PENDING in message and '"GPU": 0.9' in message, message
    # Only the deployment that cannot be placed is named.
    assert not any(f"{name} (" in message for name in asks if name != PENDING), message


if __name__ == "__main__":
    main(sys.argv[1])
