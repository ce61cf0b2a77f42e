"""The baseline image-to-3D server: hy3dgen's ``api_server.py`` pattern, single process.

Built the way upstream's API server is: ONE FastAPI process whose ``async`` handler calls the
pipeline and its post-processing (FloaterRemover, DegenerateFaceRemover, FaceReducer) directly,
blocking the event loop until the mesh is done; ``POST /generate`` with a JSON body (``image``:
base64 PNG, ``seed``, ``steps``, ``octree_resolution``) answers with the GLB. Requests that come
together are served one after another, and nothing else (not even ``/healthz``) is answered
meanwhile. The model is the same tiny checkpoint the direct benchmark runs, on CPU, with
``--threads`` torch threads (default 1, as the served Shape3D replica's ``torch_threads: 1``;
torch's own default, one per core, oversubscribes a shared 2-core machine: ``--threads 0``).

Run the server: ``.venv/bin/python -m benchmarks.baseline_mesh_server --port 8090``;
or ``--bench``: start it in a subprocess, send ``--concurrency`` requests at once (the client of
``benchmarks.mesh --baseline``), print and write ``benchmarks/results/mesh_baseline.json``.
Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from atelier3d.models.mesh import hunyuan3d as H
from benchmarks.common import DEFAULT_CACHE, LOOPBACK, REPO, RESULTS_DIR, free_port
from benchmarks.mesh import baseline_job, concurrent


def build_app(cache_dir: Path, threads: int = 1) -> FastAPI:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from hy3dgen.shapegen import (
        DegenerateFaceRemover,
        FaceReducer,
        FloaterRemover,
        Hunyuan3DDiTFlowMatchingPipeline,
    )
    from PIL import Image

    pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
        str(H.tiny_shape3d_dir(cache_dir)), subfolder=H.TINY_SUBFOLDER, device="cpu",
        dtype=torch.float32)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.post("/generate")
    async def generate(request: Request) -> Response:  # blocking on purpose, as upstream
        params = await request.json()
        image = Image.open(io.BytesIO(base64.b64decode(params["image"]))).convert("RGBA")
        mesh = pipeline(image=image, num_inference_steps=params.get("steps", 5),
                        octree_resolution=params.get("octree_resolution", 128),
                        generator=torch.Generator().manual_seed(params.get("seed", 0)),
                        enable_pbar=False)[0]
        mesh = FloaterRemover()(mesh)
        mesh = DegenerateFaceRemover()(mesh)
        mesh = FaceReducer()(mesh, max_facenum=params.get("face_count", 40000))
        return Response(mesh.export(file_type="glb"), media_type="model/gltf-binary")

    return app


def bench(args: argparse.Namespace) -> int:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.baseline_mesh_server",
                               "--port", str(port), "--cache-dir", str(args.cache_dir),
                               "--threads", str(args.threads)], cwd=REPO)
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the baseline server did not start") from None
                time.sleep(0.5)
        args.octree = [args.octree]
        results = concurrent(baseline_job, url, args)
    finally:
        server.terminate()
        server.wait(30)
    print(f"baseline: {args.concurrency} at once, latency p50 "
          f"{results['latency_ms']['p50']:.0f} ms, p95 {results['latency_ms']['p95']:.0f} ms, "
          f"round wall p50 {results['round_wall_ms']['p50']:.0f} ms")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "mesh_baseline.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--bench", action="store_true", help="start it and time it (see above)")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--octree", type=int, default=128)
    parser.add_argument("--poll-s", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.bench:
        return bench(args)
    # hy3dgen's post-processors leave .ply files in the temp dir: give them a private one.
    with tempfile.TemporaryDirectory(prefix="baseline-mesh-") as tmp:
        os.environ["TMPDIR"] = tempfile.tempdir = tmp
        uvicorn.run(build_app(args.cache_dir, args.threads), host=LOOPBACK, port=args.port,
                    log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
