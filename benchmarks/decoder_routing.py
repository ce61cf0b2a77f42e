"""Which SamDecoder replica fetches each session's embedding, with 1, 2 and 4 replicas.

SamDecoder alone (tiny weights: what is counted is routing, not decoder time) on a local Ray,
N replicas. Embeddings of several sessions are put in the object store and clicked in turns,
each click sent as the Gateway sends it (``stages.segment.routed``: its embedding's reference as
Serve's ``multiplexed_model_id``). Each replica then reports the embeddings it fetched. Without
routing by embedding a session's clicks spread over the replicas and each fetches the embedding
(up to N fetches a session); with it, one replica fetches it and the others never see it.

Each replica count runs in its own process (its own Ray). Writes
``benchmarks/results/decoder_routing.json``. Not a test; ``tests/test_decoder_routing.py`` runs
``measure`` with 2 replicas.

Run: ``.venv/bin/python -m benchmarks.decoder_routing``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import LOOPBACK, REPO, RESULTS_DIR, free_port, machine_info

MARKER = "ROUTING-REPORT "
TINY_DIR = REPO / "tests" / "fixtures" / ".generated"  # written by the tests' tiny_dir


def replica_fetches(handle, replicas: int, timeout_s: float = 120) -> dict[str, list[str]]:
    """Replica id -> the embedding keys it fetched, asking until every replica answered (the
    handle picks a replica per call)."""
    seen: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered")
        replica, fetched = handle.fetched_embeddings.remote().result(timeout_s=timeout_s)
        seen[replica] = fetched
    return seen


def measure(replicas: int, sessions: int, clicks: int, cache_dir: str) -> dict:
    """Deploys SamDecoder with ``replicas`` replicas, sends ``clicks`` clicks for each of
    ``sessions`` embeddings (in turns) as the Gateway does (``routed``), and counts the
    embedding fetches per embedding and per replica."""
    import ray
    from ray import serve

    from atelier3d.deployments.segment_decoder import SamDecoder
    from atelier3d.serve.runner import init_ray
    from atelier3d.stages.segment import DecodeRequest, routed

    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    init_ray(num_cpus=8)
    try:
        app = SamDecoder.options(
            num_replicas=replicas, ray_actor_options={"num_cpus": 0.1},
            user_config={"intra_op_threads": 1, "embedding_cache_size": 8},
        ).bind({"models": "tiny", "cache_dir": cache_dir})
        # A port of its own: other Serve instances on the machine may hold Serve's default.
        serve.start(http_options={"host": LOOPBACK, "port": free_port()})
        handle = serve.run(app, name="routing", route_prefix=None)
        rng = np.random.default_rng(0)
        # Embeddings as the encoder leaves them: arrays in the object store, owned here.
        refs = [ray.put(rng.standard_normal((1, 256, 64, 64)).astype(np.float32))
                for _ in range(sessions)]
        size = (683, 1024)
        started = time.monotonic()
        for turn in range(clicks):
            for i, ref in enumerate(refs):
                point = [size[1] * (0.1 + 0.08 * ((turn + i) % 10)), size[0] * 0.5]
                request = DecodeRequest(embedding=[ref], size=size, points=[point], labels=[1],
                                        box=None, mask_logits=None, multimask=True,
                                        return_low_res=False)
                routed(handle, request).decode.remote(request).result(timeout_s=120)
        click_s = time.monotonic() - started
        fetches = replica_fetches(handle, replicas)
    finally:
        serve.shutdown()
        ray.shutdown()
    keys = {key for fetched in fetches.values() for key in fetched}
    replicas_per_embedding = {key: sum(key in fetched for fetched in fetches.values())
                              for key in keys}
    total_fetches = sum(len(fetched) for fetched in fetches.values())
    total_clicks = sessions * clicks
    return {
        "replicas": replicas, "sessions": sessions, "clicks_per_session": clicks,
        "clicks": total_clicks, "click_s": round(click_s, 2),
        "embedding_fetches": total_fetches,
        "embedding_hits": total_clicks - total_fetches,
        "hit_rate": round(1 - total_fetches / total_clicks, 3),
        "embeddings_fetched": len(keys),
        "max_replicas_per_embedding": max(replicas_per_embedding.values(), default=0),
        "fetches_per_replica": sorted(len(fetched) for fetched in fetches.values()),
        "fetches_by_replica": {replica: fetched for replica, fetched in fetches.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=6, help="per session")
    parser.add_argument("--cache-dir", type=Path, default=TINY_DIR,
                        help="tiny checkpoints, as the tests write them")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "decoder_routing.json")
    parser.add_argument("--one", action="store_true", help="(internal) one replica count, "
                        "in this process; prints its report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one:
        report = measure(args.replicas[0], args.sessions, args.clicks, str(args.cache_dir))
        print(MARKER + json.dumps(report), flush=True)
        return report
    results: dict = {"machine": {**machine_info(),
                                 "description": "CPU VM, 2 cores, x86-64, shared"},
                     "weights": "tiny random SAM decoder, random embeddings (routing is "
                                "counted, not decoder time)",
                     "runs": []}
    for replicas in args.replicas:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.decoder_routing", "--one", "--replicas",
             str(replicas), "--sessions", str(args.sessions), "--clicks", str(args.clicks),
             "--cache-dir", str(args.cache_dir)],
            cwd=REPO, capture_output=True, text=True, timeout=1800)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
        if done.returncode or not lines:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-4000:])
        run = json.loads(lines[-1][len(MARKER):])
        print({k: v for k, v in run.items() if k != "fetches_by_replica"}, flush=True)
        results["runs"].append(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
