"""Job events and cancels across Gateway replicas with Redis sessions: how long after the
running replica emits an event does a follower on another replica get it, and how long does a
cancel sent to another replica take to end the job.

Two ``JobService``s on one real redis-server (started here, on a loopback port) stand for two
replicas: jobs run on ``a`` (a kind that reports a progress event every ``--interval-s``, at a
random phase), ``b`` follows and cancels. One process and one clock, so the latency is the
arrival time minus the emit time. No model is involved: this measures the Redis path only.

    python -m benchmarks.job_events_redis --label after
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np

from atelier3d.config import JobKindSettings, JobSettings
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.types import JobKind
from atelier3d.serve.sessions.redis_store import RedisSessionStore
from benchmarks.common import LOOPBACK, RESULTS_DIR, free_port, load_average, percentiles

MACHINE = "CPU VM, 2 cores, x86-64, shared"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="a3d-bench-redis-") as directory:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", LOOPBACK, "--save", "",
                                 "--appendonly", "no", "--dir", directory],
                                stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            yield f"redis://{LOOPBACK}:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


class TimedSteps:
    """A job kind's ``start``: ``steps`` progress events ``interval_s`` apart (random phase),
    each one's emit time kept by job name."""

    def __init__(self, steps: int, interval_s: float) -> None:
        self.steps, self.interval_s = steps, interval_s
        self.emitted: dict[str, list[float]] = {}

    def start(self, request: dict) -> AsyncIterator[dict]:
        async def events() -> AsyncIterator[dict]:
            times = self.emitted.setdefault(request["name"], [])
            await asyncio.sleep(random.uniform(0, self.interval_s))
            for step in range(1, self.steps + 1):
                await asyncio.sleep(self.interval_s)
                times.append(time.perf_counter())
                yield {"type": "progress", "stage": "denoise", "step": step, "total": self.steps}
            yield {"type": "result", "media_type": "text/plain", "data": b"ok", "meta": {}}

        return events()


async def measure(redis_url: str, jobs: int, steps: int, interval_s: float) -> dict:
    prefix = f"bench-{secrets.token_hex(4)}"
    work = TimedSteps(steps, interval_s)
    services = []
    for _ in range(2):
        store = RedisSessionStore(redis_url, prefix=prefix, ttl_s=600, max_sessions=100,
                                  max_per_client=100, max_history=8)
        service = JobService(JobSettings(max_jobs_per_session=jobs + 2), store)
        service.register(JobKind("bench", JobKindSettings(max_running=4, max_queued=64),
                                 work.start, {"denoise": 1.0}))
        services.append(service)
    a, b = services
    session = await a.store.create("client", np.zeros((8, 8, 3), np.uint8))

    async def submit(name: str):
        async def build() -> dict:
            return {"name": name}

        return await a.submit("bench", build, {"name": name},
                              session=await a.store.load(session.session_id), client="client")

    latencies_ms: list[float] = []
    for n in range(jobs):
        job = await submit(f"job{n}")
        async for event in b.follow(job.job_id):
            if event["type"] == "progress":
                emitted = work.emitted[f"job{n}"][event["step"] - 1]
                latencies_ms.append((time.perf_counter() - emitted) * 1000)

    cancels_ms: list[float] = []
    for n in range(jobs):
        work.steps = 10_000
        job = await submit(f"long{n}")
        async for event in b.follow(job.job_id):
            if event["type"] == "progress":
                break
        await asyncio.sleep(random.uniform(0, interval_s))
        start = time.perf_counter()
        cancelled = await b.cancel(job.job_id)
        cancels_ms.append((time.perf_counter() - start) * 1000)
        assert cancelled.status == "cancelled", cancelled.status
        work.steps = steps
    for service in services:
        await service.records.flush()
    return {"event_latency_ms": percentiles(latencies_ms),
            "cancel_ms": percentiles(cancels_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="names the result file")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval-s", type=float, default=0.05)
    args = parser.parse_args()
    load_start = load_average()
    with redis_server() as url:
        result = asyncio.run(measure(url, args.jobs, args.steps, args.interval_s))
    result |= {"label": args.label, "machine": MACHINE, "python": platform.python_version(),
               "weights": "none (no model: the Redis path only)", "jobs": args.jobs,
               "steps": args.steps, "interval_s": args.interval_s,
               "load_average_start": load_start, "load_average_end": load_average()}
    path = RESULTS_DIR / f"job_events_redis_{args.label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
