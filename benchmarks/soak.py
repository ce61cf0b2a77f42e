"""Soak: a bounded mixed load for minutes, on loopback, watching memory for leaks.

The real app (local.yaml, tiny models) on a local Ray; ``--people`` simulated users loop through
what people do: upload a picture, click an object with think time, undo, cut it out, sometimes
parse it, sometimes run a small edit or mesh job to the end and fetch the result, then delete
the session or walk away from it (it expires: ``sessions.ttl_s`` and ``jobs.ttl_s`` are short
here). Every ``--sample-s`` it records each deployment's resident memory (its replica
processes' RSS), the object store's use and the active sessions. After ``--warmup-s`` the
first window is the reference: the report gives each series' growth from it to the last
window (target: under 5%), and, once the load stops and the TTL passes, that the sessions went.

    .venv/bin/python -m benchmarks.soak                 # 6 minutes, 1 minute warm-up
    .venv/bin/python -m benchmarks.soak --minutes 2 --warmup-s 30

Writes ``benchmarks/results/soak.json`` and ``soak.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from atelier3d.samples import drawn_character
from benchmarks.common import (
    LOOPBACK,
    REPO,
    RESULTS_DIR,
    free_port,
    load_average,
    machine_info,
    png_bytes,
    replica_pids,
)

CACHE = REPO / ".cache" / "soak"
TTL_S = 20.0


def deployment_rss_mib() -> dict[str, float]:
    """Resident memory per deployment, summed over this cluster's live replica processes."""
    out: dict[str, float] = {}
    for name, pids in replica_pids().items():
        for pid in pids:
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
            out[name] = out.get(name, 0.0) + rss / 2**20
    return out


def object_store_mib() -> float:
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return float(match.group(1)) if match else float("nan")


def active_sessions(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_atelier_active_sessions")]
    return sum(values) if values else float("nan")


class Person:
    """One simulated user's journeys; counts what happened."""

    def __init__(self, client: httpx.AsyncClient, rng: random.Random, stats: dict) -> None:
        self.client, self.rng, self.stats = client, rng, stats

    def count(self, response: httpx.Response, what: str) -> bool:
        key = f"{what} {response.status_code}"
        self.stats[key] = self.stats.get(key, 0) + 1
        return response.is_success

    async def think(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 0.6))

    async def job(self, path: str, body: dict) -> None:
        r = await self.client.post(path, json=body)
        if not self.count(r, f"POST {path}"):
            return
        job_id = r.json()["job_id"]
        async with self.client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            async for _ in events.aiter_lines():
                pass
        self.count(await self.client.get(f"/v1/jobs/{job_id}/result"), "GET result")

    async def journey(self) -> None:
        image = drawn_character()
        noise = np.random.default_rng(self.rng.randrange(2**32)).integers(0, 24, image.shape)
        picture = png_bytes(np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8))
        r = await self.client.post("/v1/sessions?wait=true",
                                   files={"image": ("p.png", picture)})
        if not self.count(r, "POST /v1/sessions"):
            return
        session, (h, w) = r.json()["session_id"], (r.json()["height"], r.json()["width"])
        base = f"/v1/sessions/{session}"
        r = await self.client.post(f"{base}/objects")
        if not self.count(r, "POST objects"):
            return
        object_id = r.json()["object_id"]
        for _ in range(self.rng.randint(3, 8)):
            await self.think()
            point = [self.rng.uniform(0, w - 1), self.rng.uniform(0, h - 1)]
            self.count(await self.client.post(f"{base}/segment", json={
                "points": [point], "labels": [1], "object_id": object_id}), "POST segment")
        self.count(await self.client.post(f"{base}/objects/{object_id}/undo"), "POST undo")
        self.count(await self.client.post(f"{base}/cutout", json={"object_id": object_id}),
                   "POST cutout")
        roll = self.rng.random()
        source = {"kind": "object", "object_id": object_id}
        if roll < 0.2:
            self.count(await self.client.post(f"{base}/parse", json={"object_id": object_id}),
                       "POST parse")
        elif roll < 0.35:
            await self.job("/v1/jobs/edit", {"session_id": session, "source": source,
                                             "preset": "free", "prompt": "make it red",
                                             "steps": 2, "width": 256, "height": 256})
        elif roll < 0.5:
            await self.job("/v1/jobs/mesh", {"session_id": session, "source": source,
                                             "steps": 2, "octree_resolution": 32})
        if self.rng.random() < 0.5:  # the others walk away: their sessions expire
            self.count(await self.client.delete(base), "DELETE session")


async def load(base_url: str, people: int, seconds: float, seed: int, stats: dict) -> None:
    deadline = time.monotonic() + seconds

    async def person(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            walker = Person(client, rng, stats)
            while time.monotonic() < deadline:
                try:
                    await walker.journey()
                except httpx.HTTPError as exc:
                    stats[f"error {type(exc).__name__}"] = stats.get(
                        f"error {type(exc).__name__}", 0) + 1

    await asyncio.gather(*(person(i) for i in range(people)))


def sampler(samples: list[dict], stop: threading.Event, every_s: float, metrics_url: str,
            started: float) -> None:
    while not stop.is_set():
        samples.append({"t_s": round(time.monotonic() - started, 1),
                        "rss_mib": deployment_rss_mib(), "object_store_mib": object_store_mib(),
                        "active_sessions": active_sessions(metrics_url),
                        "load_average": load_average()[0]})
        stop.wait(every_s)


def growth(samples: list[dict], warmup_s: float, window_s: float) -> dict:
    """Each series' median over the first window after warm-up and over the last window."""
    end = samples[-1]["t_s"]
    first = [s for s in samples if warmup_s <= s["t_s"] < warmup_s + window_s]
    last = [s for s in samples if s["t_s"] > end - window_s]
    series = {f"rss {name}": (lambda s, n=name: s["rss_mib"].get(n))
              for name in samples[-1]["rss_mib"]}
    series["rss all replicas"] = lambda s: sum(s["rss_mib"].values())
    series["object store"] = lambda s: s["object_store_mib"]
    out = {}
    for name, get in series.items():
        a = [v for v in map(get, first) if v is not None]
        b = [v for v in map(get, last) if v is not None]
        if a and b:
            start, finish = float(np.median(a)), float(np.median(b))
            out[name] = {"after_warmup_mib": round(start, 1), "end_mib": round(finish, 1),
                         "growth_pct": round(100 * (finish - start) / start, 2) if start else None}
    return out


def plot(samples: list[dict], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in sorted(samples[-1]["rss_mib"]):
        top.plot(t, [s["rss_mib"].get(name, np.nan) for s in samples], label=name)
    top.set_ylabel("replica RSS (MiB)")
    top.legend(fontsize=7, ncol=3)
    bottom.plot(t, [s["object_store_mib"] for s in samples], label="object store (MiB)")
    bottom.plot(t, [s["active_sessions"] for s in samples], label="active sessions")
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=7)
    for axis in (top, bottom):
        axis.axvline(warmup_s, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--window-s", type=float, default=45.0)
    parser.add_argument("--people", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from atelier3d.cli import cmd_make_tiny
    from atelier3d.serve import runner

    cmd_make_tiny(argparse.Namespace(dir=str(CACHE), full_size=False))
    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    port, metrics_port = free_port(), free_port()
    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": str(CACHE), "ui": False,
        "limits": {"max_sessions_per_client": 1000},
        "fair_use": {"exempt": [LOOPBACK]},
        "sessions": {"ttl_s": TTL_S},
        "jobs": {"ttl_s": TTL_S},
    })
    base_url, metrics_url = f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{metrics_port}"
    runner.start(config, metrics_port=metrics_port, timeout_s=600)
    samples: list[dict] = []
    stats: dict[str, int] = {}
    stop = threading.Event()
    try:
        started = time.monotonic()
        thread = threading.Thread(target=sampler, args=(samples, stop, args.sample_s,
                                                        metrics_url, started), daemon=True)
        thread.start()
        asyncio.run(load(base_url, args.people, args.minutes * 60, args.seed, stats))
        loaded_s = time.monotonic() - started
        time.sleep(TTL_S + 2)
        # Expiry is lazy (any request sweeps): this one finds every abandoned session expired.
        httpx.get(f"{base_url}/v1/sessions/ses_none", timeout=30)
        time.sleep(2 * args.sample_s)
        stop.set()
        thread.join()
    finally:
        runner.stop()
    during = [s for s in samples if s["t_s"] <= loaded_s]
    report = {
        "machine": machine_info(), "people": args.people, "minutes": args.minutes,
        "warmup_s": args.warmup_s, "window_s": args.window_s, "ttl_s": TTL_S,
        "requests": dict(sorted(stats.items())), "growth": growth(during, args.warmup_s,
                                                                    args.window_s),
        "sessions_at_peak": float(np.nanmax([s["active_sessions"] for s in during])),
        "sessions_after_ttl": samples[-1]["active_sessions"], "samples": samples,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "soak.json").write_text(json.dumps(report, indent=2))
    plot(samples, args.warmup_s, RESULTS_DIR / "soak.png")
    print(f"{sum(stats.values())} requests in {loaded_s:.0f} s by {args.people} people: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(stats.items())))
    for name, row in report["growth"].items():
        print(f"  {name:28s} {row['after_warmup_mib']:8.1f} -> {row['end_mib']:8.1f} MiB "
              f"({row['growth_pct']:+.2f}%)")
    print(f"active sessions: peak {report['sessions_at_peak']:.0f}, after the TTL "
          f"{report['sessions_after_ttl']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
