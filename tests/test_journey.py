"""benchmarks/gpu/journey.py --dry-run: the GPU journey's own code (weights, the served profile,
direct calls, the journey through HTTP, GPU memory per replica, mixed users) on the CPU with the
tiny checkpoints, so the one device run it is prepared for does not fail on a bug found there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, driver_env

pytestmark = pytest.mark.cluster  # a Ray and Serve of its own, in a subprocess

STAGES = ("encode", "click", "parse", "edit", "mesh")
MODEL_DEPLOYMENTS = ("SamEncoder", "SamDecoder", "HumanParser", "ImageEditor", "Shape3D")


def test_journey_dry_run(tiny_dir, tmp_path):
    # Its own Ray and Serve, in a subprocess (this process's belongs to the ``server`` fixture).
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu/journey.py", "--dry-run", "--weights-dir", str(tiny_dir),
         "--mixed-s", "2"],
        cwd=ROOT, env=driver_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "journey_dry_run.json").read_text())

    assert report["dry_run"] and report["weights"] == "tiny random"
    assert report["profile"]["file"] == "local.yaml" and report["gpus"] == []
    served = report["served"]
    # What was served is what the run says: every model on the tiny random weights, untrained.
    assert len(served["models"]) == len(MODEL_DEPLOYMENTS), served["models"]
    assert {m["weights"] for m in served["models"].values()} == {"untrained"}
    for stage in STAGES:
        direct, journey = report["direct"][stage], served["journey"][stage]
        assert direct["p50_s"] > 0 and direct["load_s"] > 0, (stage, direct)
        seconds = journey["p50_s"] if stage == "click" else journey
        assert seconds > 0, (stage, journey)
    assert len(served["journey"]["click"]["s"]) == report["sizes"]["clicks"] == 20

    # No GPU here: the one function that reads the hardware says so, and the plan stays the
    # profile's fractions (none on the CPU profile), one entry per live replica.
    for snapshot in (served["gpu_memory"], served["gpu_memory_after_mixed"]):
        assert snapshot["other_processes_mib"] is None
        for name in MODEL_DEPLOYMENTS:
            replica = snapshot["replicas"][name]
            assert replica["planned_mib_per_replica"] is None
            assert replica["measured_mib"] == [None] * replica["replicas"], (name, replica)

    mixed = served["mixed"]
    assert mixed["users"] == {"click": 8, "edit": 2, "mesh": 1}
    assert mixed["elapsed_s"] >= mixed["duration_s"] == 2
    for kind, stats in mixed["classes"].items():
        assert stats["errors"] == 0, (kind, stats["first_errors"])
        assert stats["n"] >= 1 and stats["p95"] >= stats["p50"] > 0, (kind, stats)
