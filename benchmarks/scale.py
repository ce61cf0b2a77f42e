"""Scale-out of the click path: 1, 2 and 4 SamDecoder replicas, and an autoscaling run.

a) fixed replicas: the real app on a local Ray (as ``atelier3d serve``) with ``--replicas``
   SamDecoder replicas, ``--users`` closed-loop users clicking one encoded session for
   ``--seconds``; throughput and click latency p50/p95 per replica count;
b) autoscaling: the decoder at 1..``--max-replicas`` (target 2 ongoing requests a replica),
   ``--users`` users for ``--seconds``, then idle; the running replica count sampled twice a
   second shows it scale up under load and back down after.

The encoder/decoder/Serve code is benchmarks/sam_clicks.py's (one click generator for both).
The decoder's cost does not depend on the encoder's size (its input is always a 256x64x64
embedding), so the tiny SAM checkpoint is used: uploads encode in milliseconds.
Prints a table, writes ``benchmarks/results/scale.json`` and ``scale.png``. Not a test.

Run: ``.venv/bin/python benchmarks/scale.py`` (about 5 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
from sam_clicks import (
    DEFAULT_CACHE,
    RESULTS_DIR,
    bench_image,
    click_phase,
    decoder_replicas,
    http_client,
    load_average,
    machine_info,
    percentiles,
    png_bytes,
    served_system,
    upload,
)

from atelier3d.models.sam import tiny_checkpoint


def session_for(base_url: str, image: np.ndarray) -> str:
    async def create() -> str:
        async with http_client(base_url, 2) as client:
            session_id, sample = await upload(client, png_bytes(image), time.perf_counter())
        if session_id is None:
            raise RuntimeError(f"upload failed: {sample}")
        return session_id

    return asyncio.run(create())


def click_load(base_url: str, session_id: str, size: tuple[int, int], users: int,
               seconds: float, seed: int) -> dict:
    plan = {"session_id": session_id, "size": size, "max_clicks": 100_000, "think_s": 0.0,
            "multimask": True}
    phase = asyncio.run(click_phase(base_url, plan, users, seconds, seed))
    ok = [c.latency_ms for c in phase.clicks if c.status == 200]
    return {"clicks": len(phase.clicks), "ok": len(ok),
            "errors": len(phase.clicks) - len(ok),
            "throughput_per_s": len(ok) / phase.window_s,
            "latency_ms": percentiles(ok) if ok else None,
            "load_average": load_average()}


def fixed_replicas(args: argparse.Namespace, image: np.ndarray) -> list[dict]:
    rows = []
    for replicas in args.replicas:
        overrides = [f"SamDecoder.num_replicas={replicas}",
                     # small CPU asks so 4 replicas fit beside the others on the logical CPUs
                     "SamDecoder.ray_actor_options.num_cpus=0.25"]
        with served_system(tiny_checkpoint(args.cache_dir), args.cache_dir, "tiny",
                           overrides) as base_url:
            session_id = session_for(base_url, image)
            click_load(base_url, session_id, image.shape[:2], args.users, 3, args.seed)  # warm
            result = click_load(base_url, session_id, image.shape[:2], args.users,
                                args.seconds, args.seed)
            result["replicas"] = replicas
            result["running_replicas"] = decoder_replicas()
            rows.append(result)
            print(f"{replicas} replica(s): {result['throughput_per_s']:.1f} clicks/s, "
                  f"p50 {result['latency_ms']['p50']:.0f} ms, "
                  f"p95 {result['latency_ms']['p95']:.0f} ms, errors {result['errors']}",
                  flush=True)
    return rows


def autoscaling(args: argparse.Namespace, image: np.ndarray) -> dict:
    autoscaling_config = json.dumps({
        "min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 5, "metrics_interval_s": 0.5,
        "look_back_period_s": 2})
    overrides = ["SamDecoder.num_replicas=auto",
                 f"SamDecoder.autoscaling_config={autoscaling_config}",
                 "SamDecoder.ray_actor_options.num_cpus=0.25"]
    samples: list[tuple[float, int | None]] = []
    with served_system(tiny_checkpoint(args.cache_dir), args.cache_dir, "tiny",
                       overrides) as base_url:
        session_id = session_for(base_url, image)
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, decoder_replicas()))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(3)  # idle before
        load_from = time.perf_counter() - t0
        result = click_load(base_url, session_id, image.shape[:2], args.users, args.seconds,
                            args.seed)
        load_to = time.perf_counter() - t0
        time.sleep(args.idle_s)
        stop.set()
        sampler.join()
    counts = [n for _, n in samples if n is not None]
    print(f"autoscaling: replicas {min(counts)}..{max(counts)} (last {counts[-1]}), "
          f"{result['throughput_per_s']:.1f} clicks/s under load", flush=True)
    return {"samples": samples, "load_window_s": [load_from, load_to], "load": result}


def save_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = results["fixed"]
    replicas = [r["replicas"] for r in rows]
    left.bar([str(n) for n in replicas], [r["throughput_per_s"] for r in rows], color="#4c72b0")
    left.set_xlabel("SamDecoder replicas")
    left.set_ylabel("clicks/s", color="#4c72b0")
    twin = left.twinx()
    twin.plot([str(n) for n in replicas], [r["latency_ms"]["p95"] for r in rows], "o-",
              color="#dd8452")
    twin.set_ylabel("click p95 (ms)", color="#dd8452")
    left.set_title(f"{results['users']} closed-loop users, {results['seconds']:.0f} s each")
    scaling = results["autoscaling"]
    times = [t for t, n in scaling["samples"] if n is not None]
    counts = [n for _, n in scaling["samples"] if n is not None]
    right.step(times, counts, where="post")
    right.axvspan(*scaling["load_window_s"], alpha=0.15, color="#55a868", label="click load")
    right.set_xlabel("seconds")
    right.set_ylabel("running SamDecoder replicas")
    right.set_yticks(range(0, max(counts) + 2))
    right.legend()
    right.set_title("autoscaling (target 2 ongoing requests a replica)")
    fig.suptitle("2-core x86-64 VM, no GPU (load average shown in scale.json)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--idle-s", type=float, default=30.0, help="after the autoscaling load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()

    image = bench_image("astronaut", 1024)
    results = {"machine": machine_info(), "users": args.users, "seconds": args.seconds,
               "fixed": fixed_replicas(args, image), "autoscaling": autoscaling(args, image),
               "two_node_hop_ms": None}  # needs the two-node cluster: not built yet
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "scale.json").write_text(json.dumps(results, indent=1))
    save_plot(results, RESULTS_DIR / "scale.png")
    print(f"wrote {RESULTS_DIR / 'scale.json'} and scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
