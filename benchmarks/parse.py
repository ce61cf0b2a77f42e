"""Body/garment parsing latency: the HumanParser in this process vs served over HTTP.

What is timed is one parse of a character: SegFormer on the mask's box (a B2-size SegFormer with
random weights, so the real model's cost; written once into ``.cache/bench``), BlazePose (the real
models), per-label RLEs, the garment cut-outs and their occlusion completion, and the checks.

a) direct: ``HumanParser.parse`` called in this process, with the deployment's default
   user_config (1 torch thread, as the served replica);
b) served: ``POST /v1/sessions/{id}/parse`` over HTTP, one request at a time, against the app
   started through ``atelier3d.serve.runner`` (the packaged local.yaml sizing; SAM tiny, since only
   parsing is measured). Its first-fetch cost of the images (parse map, pose map, parts ZIP: PNG
   encoding happens on first GET) is timed separately.

Inputs: the drawn character scaled to 512 and 1024 px (long side) with its true mask. Prints
p50/p95 per phase, writes ``benchmarks/results/parse.json``. Bounded: ``--runs`` per phase, cut
short after ``--budget-s``. Not a test.

Run: ``.venv/bin/python -m benchmarks.parse`` (about 2-4 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from atelier3d import rle
from atelier3d.models.parse import segformer as parsing
from atelier3d.models.parse.pose import POSE_SOURCE
from atelier3d.models.segment.sam import tiny_checkpoint
from atelier3d.samples import drawn_character, drawn_character_labels
from benchmarks.common import DEFAULT_CACHE, REPO, RESULTS_DIR, free_port, percentiles, png_bytes

TEST_POSE_DIR = REPO / "tests" / "fixtures" / ".generated" / "pose" / "mediapipe-0.10.21"
RESULTS = RESULTS_DIR / "parse.json"
SIZES = (512, 1024)  # long side, px


def character(long_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The drawn character (5:3 portrait) with ``long_side`` px height, and its true mask."""
    width = round(long_side * 384 / 640)
    return drawn_character(width, long_side), drawn_character_labels(width, long_side) > 0


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def repeat(run, runs: int, budget_s: float, warmup: int) -> list:
    """``warmup`` untimed calls, then up to ``runs`` timed ones within ``budget_s``."""
    for _ in range(warmup):
        run()
    samples, deadline = [], time.monotonic() + budget_s
    while len(samples) < runs and (not samples or time.monotonic() < deadline):
        samples.append(run())
    return samples


def app_config(args: argparse.Namespace, segformer_dir: Path) -> dict:
    from atelier3d.serve import runner

    sam = tiny_checkpoint(args.cache_dir)
    return runner.load_serve_config(
        models="real",
        args_override={
            "cache_dir": str(args.cache_dir), "ui": False,
            "sam": {"checkpoint": str(sam.path), "model_type": sam.model_type},
            "parsing": {"segformer": str(segformer_dir), "pose": args.pose, "device": "cpu"},
        },
    )


def time_direct(parser, image: np.ndarray, mask: np.ndarray) -> dict:
    start = time.perf_counter()
    result = parser.parse(image, mask)
    return {"total_ms": (time.perf_counter() - start) * 1000, **result.timings_ms}


def time_served(http: httpx.Client, session_id: str, body: dict) -> dict:
    start = time.perf_counter()
    r = http.post(f"/v1/sessions/{session_id}/parse", json=body)
    latency = (time.perf_counter() - start) * 1000
    r.raise_for_status()
    result = r.json()
    start = time.perf_counter()
    for url in (result["parse_map_url"], result["pose_map_url"], result["zip_url"]):
        http.get(url).raise_for_status()
    assets = (time.perf_counter() - start) * 1000
    return {"latency_ms": latency, "assets_first_fetch_ms": assets,
            **{f"server_{k}": v for k, v in result["timings_ms"].items()}}


def direct_phase(args: argparse.Namespace, config: dict) -> dict:
    from atelier3d.deployments.parse import HumanParser

    parser = HumanParser.func_or_class(config)
    out = {}
    for size in SIZES:
        image, mask = character(size)
        samples = repeat(functools.partial(time_direct, parser, image, mask), args.runs,
                         args.budget_s, args.warmup)
        out[str(size)] = stats = {key: percentiles([s[key] for s in samples])
                                  for key in samples[0]}
        print(f"direct {size:>4}px: p50 {stats['total_ms']['p50']:7.0f} ms  "
              f"p95 {stats['total_ms']['p95']:7.0f} ms  (n={len(samples)})", flush=True)
    return out


def served_phase(args: argparse.Namespace, base_url: str) -> dict:
    out = {}
    with httpx.Client(base_url=base_url, timeout=600) as http:
        for size in SIZES:
            image, mask = character(size)
            r = http.post("/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(image))})
            r.raise_for_status()
            sid = r.json()["session_id"]
            body = {"rle": rle.encode(mask[None])[0]}
            samples = repeat(functools.partial(time_served, http, sid, body), args.runs,
                             args.budget_s, args.warmup)
            http.delete(f"/v1/sessions/{sid}")
            out[str(size)] = stats = {key: percentiles([s[key] for s in samples])
                                      for key in samples[0]}
            print(f"served {size:>4}px: p50 {stats['latency_ms']['p50']:7.0f} ms  "
                  f"p95 {stats['latency_ms']['p95']:7.0f} ms  (n={len(samples)})", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="timed parses per phase and size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=30.0,
                        help="a phase stops after this many seconds (at least one run)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--pose", default=str(TEST_POSE_DIR) if TEST_POSE_DIR.is_dir()
                        else POSE_SOURCE, help="pose models (as the parsing.pose setting)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    segformer_dir = args.cache_dir / "parsing" / parsing.B2_DIR
    if not (segformer_dir / "config.json").exists():
        print(f"writing the random SegFormer-B2 to {segformer_dir}", flush=True)
        parsing.write_random_segformer_b2(segformer_dir)

    load = {"before": uptime()}
    print(load["before"], flush=True)
    config = app_config(args, segformer_dir)
    started = time.monotonic()
    direct = direct_phase(args, config["applications"][0]["args"])

    from atelier3d.serve import runner

    port = config["http_options"]["port"] = free_port()  # just before: ports come and go
    runner.start(config)
    try:
        served = served_phase(args, f"http://127.0.0.1:{port}")
    finally:
        runner.stop()
    load["after"] = uptime()
    print(load["after"], flush=True)

    print(f"\n{'size':>6} {'mode':>7} {'p50 ms':>8} {'p95 ms':>8}   server parse/pose/parts p50")
    for size in map(str, SIZES):
        d, s = direct[size], served[size]
        print(f"{size:>6} {'direct':>7} {d['total_ms']['p50']:8.0f} {d['total_ms']['p95']:8.0f}"
              f"   {d['parse_ms']['p50']:.0f}/{d['pose_ms']['p50']:.0f}/"
              f"{d['parts_ms']['p50']:.0f}")
        print(f"{size:>6} {'served':>7} {s['latency_ms']['p50']:8.0f} {s['latency_ms']['p95']:8.0f}"
              f"   {s['server_parse_ms']['p50']:.0f}/{s['server_pose_ms']['p50']:.0f}/"
              f"{s['server_parts_ms']['p50']:.0f}  (+ first fetch of the images "
              f"{s['assets_first_fetch_ms']['p50']:.0f} ms)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "HumanParser.parse in-process vs POST /parse over HTTP; B2-size random SegFormer, "
                "BlazePose full, drawn character with its true mask",
        "sizes_long_side_px": list(SIZES),
        "direct": direct,
        "served": served,
        "settings": {"runs": args.runs, "warmup": args.warmup, "budget_s": args.budget_s,
                     "torch_threads": 1, "segformer": str(segformer_dir), "pose": args.pose},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": sys.version.split()[0], "load": load},
        "wall_s": time.monotonic() - started,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
