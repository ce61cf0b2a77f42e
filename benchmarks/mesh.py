"""Image-to-3D latency: Hunyuan3D per stage in this process, and jobs served over HTTP.

a) direct (default): ``atelier3d.models.mesh.hunyuan3d.generate`` in this process on the tiny random
   checkpoint (CPU here; the full-size costs need a GPU: ``benchmarks/gpu/mesh_gpu.py``), per
   stage (conditioning, denoise, volume_decode, mesh_extraction, postprocess, texture), the time
   to the untextured ``shape`` artifact and to the result, at each ``--octree``;
b) ``--served URL``: ``POST /v1/jobs/mesh`` (multipart: ``image`` = the RGBA cut-out as PNG,
   ``request`` = JSON parameters), poll ``GET /v1/jobs/{id}`` until ``succeeded``, then
   ``GET /v1/jobs/{id}/result?format=glb``; ``--concurrency`` jobs submitted at once, each
   timed from submit to its GLB, with the server's own ``stage_ms``. The same client times
   ``benchmarks.baseline_mesh_server`` (``--baseline URL``), the upstream-style server.

Input: the drawn character cut out by its true mask. Prints a table, writes
``benchmarks/results/mesh[_served|_baseline].json``. Not a test.

Run: ``.venv/bin/python -m benchmarks.mesh`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from atelier3d.config import MeshSettings
from atelier3d.models.mesh import hunyuan3d as H
from atelier3d.samples import drawn_character, drawn_character_labels
from atelier3d.stages.mesh import MeshRequest
from benchmarks.common import DEFAULT_CACHE, RESULTS_DIR, percentiles, png_bytes


def character_cutout() -> np.ndarray:
    alpha = (drawn_character_labels() > 0).astype(np.uint8) * 255
    return np.dstack([drawn_character(), alpha])


class Clock:
    """A reporter that notes when the shape artifact came."""

    def __init__(self) -> None:
        self.start, self.shape_at = time.perf_counter(), 0.0

    def report(self, stage: str, step: int, total: int, part: int | None = None,
               parts: int | None = None) -> None: ...

    def artifact(self, name: str, media_type: str, data: bytes, meta: dict | None = None) -> None:
        self.shape_at = time.perf_counter() - self.start

    def check_cancelled(self) -> None: ...


def direct(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    settings = MeshSettings(device="cpu", flashvdm=args.flashvdm)
    model = H.load_shape_pipeline(settings, "tiny", args.cache_dir)
    image = character_cutout()
    out: dict = {}
    for octree in args.octree:
        request = MeshRequest.build(image=image, steps=args.steps, octree_resolution=octree)
        H.generate(model, request, Clock(), settings)  # warm-up
        runs = []
        for seed in range(args.runs):
            clock = Clock()
            result = H.generate(model, request.model_copy(update={"seed": seed}), clock,
                                settings)
            runs.append({"total_ms": (time.perf_counter() - clock.start) * 1000,
                         "shape_ms": clock.shape_at * 1000, **result["meta"]["timings_ms"],
                         "faces": result["meta"]["faces"]})
        out[str(octree)] = {key: percentiles([r[key] for r in runs]) for key in runs[0]}
    return out


def served_job(base_url: str, image_png: bytes, params: dict, poll_s: float) -> dict:
    """One job through the v1 API, from submit to the GLB in hand."""
    with httpx.Client(base_url=base_url, timeout=600) as http:
        start = time.perf_counter()
        r = http.post("/v1/jobs/mesh", files={"image": ("cutout.png", image_png, "image/png")},
                      data={"request": json.dumps(params)})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        while (state := http.get(f"/v1/jobs/{job_id}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            time.sleep(poll_s)
        if state["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {state['status']}: {state.get('error')}")
        done = time.perf_counter()
        glb = http.get(f"/v1/jobs/{job_id}/result", params={"format": "glb"})
        glb.raise_for_status()
        return {"total_ms": (time.perf_counter() - start) * 1000,
                "job_ms": (done - start) * 1000, "glb_bytes": len(glb.content),
                "queue_ms": (state["started_at"] - state["created_at"]) * 1000,
                "run_ms": (state["finished_at"] - state["started_at"]) * 1000,
                "stage_ms": state.get("stage_ms", {})}


def baseline_job(base_url: str, image_png: bytes, params: dict, poll_s: float) -> dict:
    """One request to the upstream-style server: one blocking POST returns the GLB."""
    import base64

    with httpx.Client(base_url=base_url, timeout=600) as http:
        start = time.perf_counter()
        r = http.post("/generate", json={"image": base64.b64encode(image_png).decode(), **params})
        r.raise_for_status()
        return {"total_ms": (time.perf_counter() - start) * 1000, "glb_bytes": len(r.content)}


def concurrent(job, base_url: str, args: argparse.Namespace) -> dict:
    """``--rounds`` rounds of ``--concurrency`` jobs submitted at once."""
    image_png = png_bytes(character_cutout())
    params = {"steps": args.steps, "octree_resolution": args.octree[0], "seed": 0}
    job(base_url, image_png, params, args.poll_s)  # warm-up
    rounds = []
    with ThreadPoolExecutor(args.concurrency) as pool:
        for _ in range(args.rounds):
            start = time.perf_counter()
            jobs = list(pool.map(lambda seed: job(base_url, image_png, {**params, "seed": seed},
                                                  args.poll_s), range(args.concurrency)))
            rounds.append({"wall_ms": (time.perf_counter() - start) * 1000, "jobs": jobs})
    latencies = [j["total_ms"] for r in rounds for j in r["jobs"]]
    return {"concurrency": args.concurrency, "latency_ms": percentiles(latencies),
            "round_wall_ms": percentiles([r["wall_ms"] for r in rounds]), "rounds": rounds}


def print_direct(results: dict) -> None:
    keys = ["total_ms", "shape_ms", *H.STAGES]
    print(f"{'octree':>6} " + " ".join(f"{k:>15}" for k in keys) + f" {'faces':>7}")
    for octree, stats in results.items():
        print(f"{octree:>6} " + " ".join(f"{stats[k]['p50']:>15.1f}" for k in keys)
              + f" {stats['faces']['p50']:>7.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--served", metavar="URL", help="time jobs on a running atelier3d server")
    target.add_argument("--baseline", metavar="URL",
                        help="time benchmarks.baseline_mesh_server at URL")
    parser.add_argument("--octree", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per octree (direct)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (direct)")
    parser.add_argument("--flashvdm", action="store_true", help="FlashVDM decoding (direct)")
    parser.add_argument("--concurrency", type=int, default=3, help="jobs at once (served)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of jobs (served)")
    parser.add_argument("--poll-s", type=float, default=0.1)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, help="results JSON (default: results/<mode>.json)")
    args = parser.parse_args()

    env = {"python": sys.version.split()[0], "machine": platform.machine(),
           "processor": platform.processor()}
    if args.served or args.baseline:
        url, job, name = ((args.served, served_job, "mesh_served") if args.served
                          else (args.baseline, baseline_job, "mesh_baseline"))
        results = concurrent(job, url, args)
        if args.served:
            jobs = [j for r in results["rounds"] for j in r["jobs"]]
            results["queue_ms"] = percentiles([j["queue_ms"] for j in jobs])
            results["run_ms"] = percentiles([j["run_ms"] for j in jobs])
            print(f"server side: queued p50 {results['queue_ms']['p50']:.0f} ms (max "
                  f"{results['queue_ms']['max']:.0f}), running p50 "
                  f"{results['run_ms']['p50']:.0f} ms (min {results['run_ms']['min']:.0f})")
        lat, wall = results["latency_ms"], results["round_wall_ms"]
        print(f"{name}: {args.concurrency} at once, latency p50 {lat['p50']:.0f} ms (min "
              f"{lat['min']:.0f}), p95 {lat['p95']:.0f} ms, round wall p50 {wall['p50']:.0f} ms "
              f"(min {wall['min']:.0f})")
    else:
        name = "mesh"
        results = direct(args)
        print_direct(results)
    # --out may lie anywhere (outside the repository too): print it as given, never relative.
    out = (args.out or RESULTS_DIR / f"{name}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                               "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
