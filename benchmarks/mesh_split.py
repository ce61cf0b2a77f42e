"""Mesh jobs with the CPU half on its own deployment, against the whole job on Shape3D.

One Shape3D replica (the accelerator's: conditioning, denoising, volume decoding, surface
extraction) and one MeshFinish replica (clean-up, texture projection, GLB export) run on an
embedded Ray, tiny random Hunyuan3D weights. The Gateway's own job service drives them, as
``mesh.stages`` says: ``single`` streams the whole job from ``Shape3D.generate`` (the path before
the split, still selectable), ``split`` streams ``Shape3D.shape`` and then ``MeshFinish.finish``.
Both modes run side by side in one run, on the same replicas, at 1, 2 and 4 concurrent jobs
(``jobs.mesh.max_running``; ``--jobs-per-slot`` x that many jobs submitted at once), each
``--rounds`` times, the two modes alternating; the summary is the median over the rounds.

Per mode and concurrency: meshes per hour (jobs / wall time from the first submit to the last
result), each job's latency, and the GPU-stage idle fraction: 1 - (the accelerator half's time,
summed over the jobs from the replica's own stage timings) / wall time. Under ``single`` the
replica holds its lock (and the card) through the CPU half too; under ``split`` it takes the
next job meanwhile.

On a CPU-only machine both halves share the same cores, so the split overlaps work that competes
for them: the figures here measure the mechanism (is the accelerator half's replica kept busy),
not a GPU's gain. Writes ``benchmarks/results/mesh_split.json``. Not a test.

Run: ``.venv/bin/python -m benchmarks.mesh_split`` (several minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
from ray import serve

from atelier3d.config import AppConfig
from atelier3d.deployments.mesh import Shape3D
from atelier3d.deployments.mesh_finish import MeshFinish
from atelier3d.serve import runner
from atelier3d.serve.app import model_slice
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.mesh.service import mesh_kind
from atelier3d.serve.sessions.memory import MemorySessionStore
from atelier3d.stages.mesh import MeshRequest
from benchmarks.common import DEFAULT_CACHE, RESULTS_DIR, load_average, machine_info, percentiles
from benchmarks.mesh import character_cutout

GPU_HALF = ("conditioning", "denoise", "volume_decode", "mesh_extraction")
MODES = ("single", "split")


def app_config(args: argparse.Namespace, mode: str, concurrency: int) -> AppConfig:
    return AppConfig.model_validate({
        "models": "tiny", "cache_dir": str(args.cache_dir),
        "mesh": {"device": args.device, "postprocess": args.postprocess, "stages": mode},
        "jobs": {"mesh": {"max_running": concurrency, "max_queued": 64}}})


async def run_jobs(config: AppConfig, shape3d, finish, request: MeshRequest, count: int) -> dict:
    jobs = JobService(config.jobs, MemorySessionStore(ttl_s=3600, max_sessions=8,
                                                      max_per_client=8))
    jobs.register(mesh_kind(config, shape3d, finish))

    async def build() -> MeshRequest:
        return request

    start = time.perf_counter()
    submitted = [await jobs.submit("mesh", build, {"job": i}, session=None, client="bench")
                 for i in range(count)]
    await asyncio.gather(*(job.task for job in submitted))
    wall_s = time.perf_counter() - start
    failed = [job.error for job in submitted if job.status != "succeeded"]
    if failed:
        raise RuntimeError(f"jobs failed: {failed}")
    timings = [job.result.meta["timings_ms"] for job in submitted]
    gpu_busy_s = sum(t[stage] for t in timings for stage in GPU_HALF) / 1000
    return {
        "jobs": count, "wall_s": round(wall_s, 2),
        "meshes_per_hour": round(count / wall_s * 3600, 1),
        "gpu_stage_busy_s": round(gpu_busy_s, 2),
        "gpu_stage_idle_fraction": round(max(0.0, 1 - gpu_busy_s / wall_s), 3),
        "latency_s": percentiles([job.finished_at - job.created_at for job in submitted]),
        "cpu_half_ms": percentiles([t["postprocess"] + t["texture"] for t in timings]),
        "gpu_half_ms": percentiles([sum(t[s] for s in GPU_HALF) for t in timings]),
        "faces": submitted[0].result.meta["faces"],
    }


def summarise(runs: list[dict], concurrency: int, mode: str) -> dict:
    """The median of the rounds of one (concurrency, mode)."""
    mine = [r for r in runs if r["concurrency"] == concurrency and r["mode"] == mode]
    return {"mode": mode, "concurrency": concurrency, "rounds": len(mine),
            **{key: round(float(np.median([r[key] for r in mine])), 3)
               for key in ("meshes_per_hour", "gpu_stage_idle_fraction", "wall_s")},
            "latency_p50_s": round(float(np.median([r["latency_s"]["p50"] for r in mine])), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs-per-slot", type=int, default=2,
                        help="jobs submitted per concurrent slot (at least 2: a pipeline)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each (concurrency, mode) this many times, alternating, so that a "
                        "shared machine's drifting load falls on both modes alike")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--octree", type=int, default=64)
    parser.add_argument("--target-faces", type=int, default=2000)
    parser.add_argument("--postprocess", choices=["fast", "pymeshlab"], default="pymeshlab")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="Shape3D's (MeshFinish never uses one)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--machine", default="CPU VM, 2 cores, x86-64, shared with other jobs",
                        help="what the result file says the machine was")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "mesh_split.json")
    args = parser.parse_args()

    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    info = machine_info()
    runner.init_ray(num_gpus=1 if args.device == "cuda" else None)
    # Both modes on the same two replicas: the mode is the Gateway's (its job kind), so the
    # comparison is not one of two deployments' placement or warm-up.
    section = model_slice(app_config(args, "split", 1), "mesh")
    most = max(args.concurrency)
    gpus = 1 if args.device == "cuda" else 0
    shape3d = serve.run(Shape3D.options(num_replicas=1, max_ongoing_requests=most + 1,
                                        ray_actor_options={"num_cpus": 1, "num_gpus": gpus}
                                        ).bind(section),
                        name="bench-shape3d", route_prefix=None)
    finish = serve.run(MeshFinish.options(num_replicas=1, max_ongoing_requests=most,
                                          ray_actor_options={"num_cpus": 1}).bind(section),
                       name="bench-finish", route_prefix=None)
    request = MeshRequest.build(image=character_cutout(), steps=args.steps,
                                octree_resolution=args.octree,
                                target_face_count=args.target_faces)
    try:
        for mode in MODES:  # warm-up: one job each way
            asyncio.run(run_jobs(app_config(args, mode, 1), shape3d, finish, request, 1))
        runs = []
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for mode in MODES:  # alternating: both modes under the same machine load
                    count = concurrency * args.jobs_per_slot
                    result = asyncio.run(run_jobs(app_config(args, mode, concurrency), shape3d,
                                                  finish, request, count))
                    runs.append({"mode": mode, "concurrency": concurrency, "round": round_,
                                 **result, "load_average": load_average()})
                    print(f"{mode:>6} x{concurrency} #{round_}: "
                          f"{result['meshes_per_hour']:8.1f} meshes/h, GPU stage idle "
                          f"{result['gpu_stage_idle_fraction']:.0%}, p50 "
                          f"{result['latency_s']['p50']:.1f} s ({count} jobs, "
                          f"{result['wall_s']:.1f} s)", flush=True)
    finally:
        serve.shutdown()
    summary = [summarise(runs, concurrency, mode)
               for concurrency in args.concurrency for mode in MODES]
    print("\nmedian over rounds:")
    for row in summary:
        print(f"{row['mode']:>6} x{row['concurrency']}: {row['meshes_per_hour']:8.1f} meshes/h, "
              f"GPU stage idle {row['gpu_stage_idle_fraction']:.0%}")
    out = {
        "machine": {**info, "description": args.machine},
        "weights": f"tiny random Hunyuan3D-2 (atelier3d models make-tiny), on {args.device}",
        "setup": {"device": args.device, "shape3d_replicas": 1, "mesh_finish_replicas": 1,
                  "steps": args.steps,
                  "octree_resolution": args.octree, "target_face_count": args.target_faces,
                  "postprocess": args.postprocess, "jobs_per_slot": args.jobs_per_slot,
                  "torch_threads": 1},
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
