"""Scale-out of the click path: 1, 2 and 4 SamDecoder replicas, and an autoscaling run.

a) fixed replicas: the real app on a local Ray (as ``atelier3d serve``) with ``--replicas``
   SamDecoder replicas, ``--users`` closed-loop users clicking one encoded session for
   ``--seconds``; throughput and click latency p50/p95 per replica count;
b) autoscaling: the decoder at 1..``--max-replicas`` (target 2 ongoing requests a replica),
   ``--users`` users for ``--seconds``, then idle; the running replica count sampled twice a
   second shows it scale up under load and back down after;
c) two nodes: a real two-node Ray cluster on this machine (``atelier3d.devcluster``, the
   ``two-node.yaml`` profile: Gateway and proxy on the head, models on the other node), one user
   clicking ``--hop-clicks`` times with the SamDecoder on the Gateway's node, then on the other
   node. The hop is the Gateway's click time less the decoder's own run and the embedding wait
   (``total_ms - decode_ms - wait_embedding_ms``): handle, router, (de)serialisation, network;
   ``two_node_hop_ms`` is how much crossing nodes adds to it (p50).

The encoder/decoder/Serve code is ``benchmarks.sam_clicks``'s (one click generator for both).
The decoder's cost does not depend on the encoder's size (its input is always a 256x64x64
embedding), so the tiny SAM checkpoint is used: uploads encode in milliseconds.
Prints a table, writes ``benchmarks/results/scale.json`` (the sections run) and ``scale.png``.
Not a test.

Run: ``.venv/bin/python -m benchmarks.scale`` (about 8 minutes on a 2-core CPU);
``--sections two-node`` for the two-node part alone (2-4 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from atelier3d.models.segment.sam import tiny_checkpoint
from benchmarks.common import (
    DEFAULT_CACHE,
    REPO,
    RESULTS_DIR,
    free_port,
    load_average,
    machine_info,
    percentiles,
    png_bytes,
)
from benchmarks.sam_clicks import (
    bench_image,
    click_phase,
    decoder_replicas,
    http_client,
    served_system,
    upload,
)

TWO_NODE_CONFIG = REPO / "atelier3d" / "serve" / "configs" / "two-node.yaml"


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


def hop_clicks(base_url: str, image: np.ndarray, clicks: int) -> dict:
    """One user's clicks on a fresh session: client and Gateway latencies, the decoder's own
    time, and the hop (the Gateway's time less the decode and the embedding wait)."""
    import httpx

    rows = []
    with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as http:
        r = http.post("/v1/sessions?wait=true", files={"image": ("b.png", png_bytes(image))})
        r.raise_for_status()
        sid = r.json()["session_id"]
        height, width = image.shape[:2]
        rng = np.random.default_rng(0)
        for _ in range(clicks + 1):
            point = [float(rng.uniform(0, width)), float(rng.uniform(0, height))]
            start = time.perf_counter()
            r = http.post(f"/v1/sessions/{sid}/segment", json={"points": [point], "labels": [1]})
            client_ms = (time.perf_counter() - start) * 1000
            r.raise_for_status()
            t = r.json()["timings_ms"]
            rows.append({"client_ms": client_ms, **t,
                         "hop_ms": t["total_ms"] - t["decode_ms"] - t["wait_embedding_ms"]})
        http.delete(f"/v1/sessions/{sid}")
    first, steady = rows[0], rows[1:]  # the first pulls the embedding to the decoder's node
    return {"first_click": first,
            **{key: percentiles([row[key] for row in steady])
               for key in ("client_ms", "total_ms", "decode_ms", "hop_ms")}}


def two_node(args: argparse.Namespace, image: np.ndarray) -> dict:
    """Click hop with the decoder beside the Gateway (head) and on the model node."""
    import ray
    from ray import serve

    from atelier3d.devcluster import LocalCluster
    from atelier3d.serve import runner

    checkpoint = tiny_checkpoint(args.cache_dir)
    out: dict = {}
    with LocalCluster() as cluster:
        # `head_node`: room beside the Gateway (which takes the whole `gateway` resource)
        address = cluster.start_head(num_cpus=2, resources={"gateway": 1, "head_node": 1},
                                     dashboard=False)
        cluster.add_node("models", num_cpus=2, resources={"model_node": 1})
        os.environ["RAY_AUTH_MODE"] = "disabled"  # as the cluster's processes have it
        ray.init(address=address, log_to_driver=False)
        # ray.init took SIGTERM over: a terminated benchmark must still stop its cluster.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            port = free_port()
            for placement, resources in (("other_node", {"model_node": 0.1}),
                                         ("same_node", {"head_node": 0.1})):
                config = runner.load_serve_config(TWO_NODE_CONFIG, models="tiny", port=port,
                                                  args_override={
                    "cache_dir": str(args.cache_dir), "ui": False,
                    "sam": {"checkpoint": str(checkpoint.path)},
                    "sessions": {"backend": "memory"}})
                for deployment in config["applications"][0]["deployments"]:
                    if deployment["name"] == "SamDecoder":
                        deployment["ray_actor_options"]["resources"] = resources
                started = time.monotonic()
                runner.deploy(config, timeout_s=600)  # the second only moves the decoder
                result = hop_clicks(f"http://127.0.0.1:{port}", image, args.hop_clicks)
                result["deploy_s"] = round(time.monotonic() - started, 1)
                result["decoder_node_resources"] = sorted(
                    k for k in nodes[decoder_node()] if k in ("head_node", "model_node"))
                out[placement] = result
                print(f"decoder on {placement} ({result['decoder_node_resources']}): client p50 "
                      f"{result['client_ms']['p50']:.1f} ms, Gateway p50 "
                      f"{result['total_ms']['p50']:.1f} ms, decode p50 "
                      f"{result['decode_ms']['p50']:.1f} ms, hop p50 "
                      f"{result['hop_ms']['p50']:.1f} ms (p95 {result['hop_ms']['p95']:.1f}); "
                      f"first click {result['first_click']['total_ms']:.0f} ms", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    out["two_node_hop_ms"] = out["other_node"]["hop_ms"]["p50"] - out["same_node"]["hop_ms"]["p50"]
    print(f"crossing nodes adds {out['two_node_hop_ms']:.1f} ms to a click's hop (p50)",
          flush=True)
    return out


def decoder_node() -> str:
    """The node id of the (one) running SamDecoder replica, from Ray's actor table."""
    import ray

    for actor in ray._private.state.actors().values():  # the GCS's table: no dashboard needed
        if (actor["State"] == "ALIVE" and actor.get("Name", "").startswith("SERVE_REPLICA::")
                and "#SamDecoder#" in actor["Name"]):
            return actor["Address"]["NodeID"]
    raise RuntimeError("no running SamDecoder replica")


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
    parser.add_argument("--sections", nargs="+", default=["fixed", "autoscaling", "two-node"],
                        choices=["fixed", "autoscaling", "two-node"])
    parser.add_argument("--hop-clicks", type=int, default=40, help="per decoder placement")
    args = parser.parse_args()

    image = bench_image("astronaut", 1024)
    path = RESULTS_DIR / "scale.json"
    # Sections not run this time keep their last results.
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"machine": machine_info(), "users": args.users, "seconds": args.seconds})
    if "fixed" in args.sections:
        results["fixed"] = fixed_replicas(args, image)
    if "autoscaling" in args.sections:
        results["autoscaling"] = autoscaling(args, image)
    if "two-node" in args.sections:
        results["two_node"] = two_node(args, image)
        results["two_node_hop_ms"] = results["two_node"]["two_node_hop_ms"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    if "fixed" in results and "autoscaling" in results:
        save_plot(results, RESULTS_DIR / "scale.png")
    print(f"wrote {path}" + (" and scale.png" if "fixed" in results else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
