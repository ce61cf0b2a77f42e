"""SAM click latency: the raw ONNX decoder, the served system, and a one-lock baseline server.

Phases (each bounded in time and count; see ``--help`` and benchmarks/README.md):

a) raw decoder: the served decoder's ONNX file and session options (1 intra-op thread), in this
   process, on a real embedding of a 1024-wide photo from the full-size (random) vit_b encoder;
b) served clicks over HTTP against the real app started through ``atelier3d.serve.runner`` with
   1, 4 and 16 closed-loop users, all clicking one shared, already-encoded session; then one user
   whose clicks alternate with raw decoder runs (the paired phase the p50 target is judged on);
c) mixed load: new images uploaded at the rate the served encoder sustains (measured in b) while
   16 users click, on the served system and then on ``baseline_server.py`` (one process, one lock).

Prints the numbers, writes ``benchmarks/results/<stem>.json`` and ``<stem>.png``. The random
checkpoint and the ONNX cache live in ``.cache/bench`` (git-ignored). Not a test.

Run: ``.venv/bin/python -m benchmarks.sam_clicks`` (7-9 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from atelier3d.models.segment.sam import (
    RANDOM_VIT_B_NAME,
    SamCheckpoint,
    resolve_checkpoint,
    write_random_checkpoint,
)
from atelier3d.optimizations.segment_onnx import cached_decoder_onnx
from atelier3d.stages.segment import decoder_prompt
from benchmarks.common import (
    DEFAULT_CACHE,
    LOOPBACK,
    REPO,
    RESULTS_DIR,
    free_port,
    load_average,
    machine_info,
    percentiles,
    png_bytes,
)

BASELINE_MODULE = "benchmarks.baseline_server"  # run from the repository root, like this one

# The two targets this benchmark reports against.
SERVED_P50_FACTOR, SERVED_P50_SLACK_MS = 1.15, 5.0
MIXED_P95_RATIO = 20.0


# ---- samples and statistics --------------------------------------------------------------------


@dataclass
class Click:
    """One click as the client saw it, plus the server's own timings from the response."""

    t_s: float  # start, seconds after the phase started
    latency_ms: float
    status: int  # HTTP status; 0 when the request itself failed
    server_total_ms: float | None = None  # SegmentResponse.timings_ms.total_ms
    decode_ms: float | None = None  # ORT session.run inside the decoder
    response_bytes: int = 0
    error: str | None = None


@dataclass
class Upload:
    t_s: float
    latency_ms: float
    status: int


@dataclass
class PhaseResult:
    clicks: list[Click]
    window_s: float
    uploads: list[Upload] = field(default_factory=list)
    unfinished_clicks: int = 0
    meta: dict = field(default_factory=dict)


def phase_summary(phase: PhaseResult) -> dict:
    ok = [c for c in phase.clicks if c.status == 200]
    summary = {
        "latency_ms": percentiles([c.latency_ms for c in ok]),
        "throughput_clicks_s": len(ok) / phase.window_s if phase.window_s > 0 else 0.0,
        "errors": len(phase.clicks) - len(ok),
        "unfinished": phase.unfinished_clicks,
        "server_total_ms": percentiles([c.server_total_ms for c in ok if c.server_total_ms]),
        "decode_ms": percentiles([c.decode_ms for c in ok if c.decode_ms]),
        "response_kib_mean": float(np.mean([c.response_bytes for c in ok]) / 1024) if ok else 0,
        "window_s": phase.window_s,
    }
    if phase.uploads:
        summary["uploads"] = {
            "sent": len(phase.uploads),
            "ok": sum(u.status == 201 for u in phase.uploads),
            "unfinished": sum(u.status == -1 for u in phase.uploads),
            "latency_ms": percentiles([u.latency_ms for u in phase.uploads if u.status == 201]),
        }
    return {**summary, **phase.meta}


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used) for every process we may read in /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return table


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, machine busy CPU s, CPU s of this process's tree: Ray, replicas, baseline)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    table = _process_table()
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:  # walk down the tree: Ray's raylet and workers descend from this process
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        ours.update(children)
        frontier.extend(children)
    return time.monotonic(), busy, sum(table[pid][1] for pid in ours if pid in table)


@contextlib.contextmanager
def cpu_meter(out: dict) -> Iterator[None]:
    """Records in ``out`` how many cores the machine, this benchmark and everyone else used.

    Other agents share this machine; their share is what makes a run noisy, so every phase
    states it. Processes that exit during the phase are missed, so "others" is an upper bound.
    """
    wall0, busy0, ours0 = _cpu_snapshot()
    load = load_average()
    yield
    wall1, busy1, ours1 = _cpu_snapshot()
    wall = max(wall1 - wall0, 1e-9)
    machine, ours = (busy1 - busy0) / wall, (ours1 - ours0) / wall
    out["load_average_before"] = load
    out["cpu_cores_used"] = {"machine": round(machine, 2), "benchmark": round(ours, 2),
                             "others": round(max(0.0, machine - ours), 2)}


# ---- models and inputs -------------------------------------------------------------------------


def bench_image(name: str, width: int) -> np.ndarray:
    """A skimage photo resized to ``width`` px wide (coffee -> 1024x683), as uint8 RGB."""
    from atelier3d.samples import photo

    src = Image.fromarray(photo(name))
    height = round(src.height * width / src.width)
    return np.asarray(src.resize((width, height), Image.BICUBIC), dtype=np.uint8)


def prepare_checkpoint(cache_dir: Path, checkpoint: str | None = None) -> SamCheckpoint:
    """``checkpoint``, or the full-size vit_b with random weights, written once into the
    (git-ignored) cache; the decoder ONNX files are exported too."""
    path = Path(checkpoint) if checkpoint else cache_dir / "sam" / RANDOM_VIT_B_NAME
    if not path.exists() and not checkpoint:
        print(f"writing random vit_b checkpoint to {path}", flush=True)
        write_random_checkpoint(path, "vit_b")
    checkpoint = resolve_checkpoint(str(path), "real", cache_dir=cache_dir)
    for multimask in (True, False):  # export now so no server pays for it during a phase
        cached_decoder_onnx(checkpoint, cache_dir, multimask=multimask)
    return checkpoint


def encode_in_process(checkpoint: SamCheckpoint, image: np.ndarray,
                      threads: int) -> tuple[np.ndarray, float]:
    """A real embedding via ``SamPredictor.set_image`` (SAM's own preprocessing)."""
    import torch
    from segment_anything import SamPredictor

    torch.set_num_threads(threads)
    predictor = SamPredictor(checkpoint.build())
    start = time.perf_counter()
    with torch.inference_mode():
        predictor.set_image(image)
    seconds = time.perf_counter() - start
    return predictor.features.float().cpu().numpy().copy(), seconds


def random_point(rng: np.random.Generator, size: tuple[int, int]) -> list[float]:
    height, width = size
    return [float(rng.uniform(0, width - 1)), float(rng.uniform(0, height - 1))]


class RawDecoder:
    """The served decoder's ONNX graph in this process, with SamDecoder.reconfigure's session
    options (1 intra-op thread, CPU provider), on a fixed embedding."""

    def __init__(self, onnx_path: Path, embedding: np.ndarray, size: tuple[int, int],
                 threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=["CPUExecutionProvider"])
        self.embedding = embedding
        self.size = size

    def click(self, point: list[float]) -> tuple[float, float]:
        """One click: (``session.run`` ms, what SamDecoder reports as decode_ms; prompt + run +
        RLE ms, the decoder replica's whole compute)."""
        from atelier3d import rle

        start = time.perf_counter()
        prompt = decoder_prompt(self.size, np.array([point]), np.array([1.0]), None, None)
        feeds = prompt.feeds(self.embedding)
        run_start = time.perf_counter()
        masks, _, _ = self.session.run(None, feeds)
        run_ms = (time.perf_counter() - run_start) * 1000
        rle.encode(masks[0])
        return run_ms, (time.perf_counter() - start) * 1000


def raw_decoder_latency(decoder: RawDecoder, runs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    for _ in range(3):  # warm-up: ORT allocates its arena on the first calls
        decoder.click(random_point(rng, decoder.size))
    pairs = [decoder.click(random_point(rng, decoder.size)) for _ in range(runs)]
    return {"run_ms": [p[0] for p in pairs], "with_prompt_and_rle_ms": [p[1] for p in pairs]}


# ---- HTTP client -------------------------------------------------------------------------------


def http_client(base_url: str, connections: int) -> httpx.AsyncClient:
    # trust_env=False: never send loopback traffic through an HTTP(S)_PROXY from the environment.
    return httpx.AsyncClient(
        base_url=base_url, trust_env=False, timeout=httpx.Timeout(600.0, connect=10.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def upload(client: httpx.AsyncClient, png: bytes, t0: float) -> tuple[str | None, Upload]:
    start = time.perf_counter()
    try:
        response = await client.post("/v1/sessions", params={"wait": "true"},
                                     files={"image": ("image.png", png, "image/png")})
        status = response.status_code
    except httpx.HTTPError:
        response, status = None, 0
    sample = Upload(t_s=start - t0, latency_ms=(time.perf_counter() - start) * 1000, status=status)
    session_id = response.json()["session_id"] if status == 201 else None
    return session_id, sample


async def click(client: httpx.AsyncClient, session_id: str, point: list[float],
                multimask: bool, t0: float) -> Click:
    body = {"points": [point], "labels": [1], "multimask": multimask}
    start = time.perf_counter()
    try:
        response = await client.post(f"/v1/sessions/{session_id}/segment", json=body)
    except httpx.HTTPError as exc:
        return Click(start - t0, (time.perf_counter() - start) * 1000, 0, error=repr(exc))
    latency_ms = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        return Click(start - t0, latency_ms, response.status_code, error=response.text[:200])
    timings = response.json()["timings_ms"]
    return Click(start - t0, latency_ms, 200, timings["total_ms"], timings["decode_ms"],
                 len(response.content))


@dataclass
class ClickPlan:
    """What every simulated user does: click random points until the deadline or the count."""

    session_id: str
    size: tuple[int, int]
    deadline: float  # perf_counter time after which no new click starts
    max_clicks: int  # per user
    think_s: float  # pause between a response and the next click (0: closed loop)
    multimask: bool


async def user(client: httpx.AsyncClient, plan: ClickPlan, seed: int, t0: float,
               out: list[Click]) -> None:
    rng = np.random.default_rng(seed)
    # Users who think are desynchronised: a random start offset and a jittered pause (mean
    # think_s), else all 16 would stay in lockstep and arrive as bursts.
    await asyncio.sleep(rng.uniform(0, plan.think_s))
    for _ in range(plan.max_clicks):
        if time.perf_counter() >= plan.deadline:
            return
        out.append(await click(client, plan.session_id, random_point(rng, plan.size),
                               plan.multimask, t0))
        await asyncio.sleep(plan.think_s * rng.uniform(0.5, 1.5))


async def click_phase(base_url: str, plan_args: dict, users: int, seconds: float,
                      seed: int) -> PhaseResult:
    """``users`` concurrent users for ``seconds``; throughput over the span until the last reply."""
    t0 = time.perf_counter()
    plan = ClickPlan(deadline=t0 + seconds, **plan_args)
    clicks: list[Click] = []
    async with http_client(base_url, users + 2) as client:
        await asyncio.gather(*(user(client, plan, seed + i, t0, clicks) for i in range(users)))
    return PhaseResult(clicks=clicks, window_s=time.perf_counter() - t0)


async def paired_phase(base_url: str, plan_args: dict, decoder: RawDecoder, seconds: float,
                       seed: int) -> tuple[PhaseResult, list[float]]:
    """One user whose every served click is preceded by the same click on the raw decoder.

    The machine is shared and its load drifts by the minute; alternating the two puts both
    under the same conditions, so their ratio is fair where two separate phases' is not.
    """
    t0 = time.perf_counter()
    plan = ClickPlan(deadline=t0 + seconds, **plan_args)
    rng = np.random.default_rng(seed)
    clicks: list[Click] = []
    raw_ms: list[float] = []
    async with http_client(base_url, 2) as client:
        for _ in range(plan.max_clicks):
            if time.perf_counter() >= plan.deadline:
                break
            point = random_point(rng, plan.size)
            raw_ms.append(decoder.click(point)[0])
            clicks.append(await click(client, plan.session_id, point, plan.multimask, t0))
    return PhaseResult(clicks=clicks, window_s=time.perf_counter() - t0), raw_ms


async def mixed_phase(base_url: str, plan_args: dict, users: int, pngs: list[bytes],
                      interval_s: float, uploads: int, grace_s: float, seed: int) -> PhaseResult:
    """Open-loop uploads every ``interval_s`` while ``users`` click; waits ``grace_s`` at most
    for clicks still in flight at the end (they are the tail, dropping them would flatter)."""
    t0 = time.perf_counter()
    window = interval_s * uploads
    plan = ClickPlan(deadline=t0 + window, **plan_args)
    clicks: list[Click] = []
    upload_samples: list[Upload] = []

    async def scheduled_upload(i: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, t0 + i * interval_s - time.perf_counter()))
        start = time.perf_counter()
        try:
            _, sample = await upload(client, pngs[i % len(pngs)], t0)
        except asyncio.CancelledError:
            # Still encoding when the clicks ended: kept as unfinished (status -1), not dropped.
            upload_samples.append(Upload(start - t0, (time.perf_counter() - start) * 1000, -1))
            raise
        upload_samples.append(sample)

    async with http_client(base_url, users + uploads + 2) as client:
        user_tasks = [asyncio.create_task(user(client, plan, seed + i, t0, clicks))
                      for i in range(users)]
        upload_tasks = [asyncio.create_task(scheduled_upload(i, client)) for i in range(uploads)]
        _, pending = await asyncio.wait(user_tasks, timeout=window + grace_s)
        end = time.perf_counter()
        unfinished = len(pending)
        for task in [*pending, *upload_tasks]:
            task.cancel()
        await asyncio.gather(*user_tasks, *upload_tasks, return_exceptions=True)
    return PhaseResult(clicks=clicks, window_s=end - t0, uploads=upload_samples,
                       unfinished_clicks=unfinished,
                       meta={"upload_times_s": [i * interval_s for i in range(uploads)]})


# ---- the two systems ---------------------------------------------------------------------------


def apply_deployment_overrides(config: dict, overrides: list[str]) -> None:
    """``Deployment.key.sub=value`` (value in YAML) into the Serve config's deployments, for
    what-if runs; the default run leaves local.yaml's sizing exactly as it is."""
    import yaml

    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    for override in overrides:
        path, value = override.split("=", 1)
        name, *keys = path.split(".")
        node = deployments[name]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(value)


@contextlib.contextmanager
def served_system(checkpoint: SamCheckpoint, cache_dir: Path, models: str,
                  overrides: list[str], direct_ingress: bool = False) -> Iterator[str]:
    """The real app (every deployment in local.yaml) on a local Ray, as ``atelier3d serve``.
    ``direct_ingress``: yields the Gateway replica's own port instead of Serve's proxy."""
    from atelier3d.serve import runner

    os.environ.setdefault("ATELIER3D_RAY_LOGS", "0")
    port = free_port()
    if direct_ingress:
        # Ray Serve's feature flag: the ingress replica serves HTTP itself on a port from this
        # range (the first one for the only Gateway replica); the proxy runs beside it. Read by
        # Serve's controller and replicas, which inherit this environment from ray.init.
        replica_port = free_port()
        os.environ.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
                          RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(replica_port),
                          RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(replica_port + 20))
    config = runner.load_serve_config(
        models=models,
        port=port,
        args_override={
            "cache_dir": str(cache_dir),
            "sam": {"checkpoint": str(checkpoint.path)},
            # The benchmark drives the /v1 API; the Gradio UI is not on the click path.
            "ui": False,
            # Every simulated user shares 127.0.0.1, which the per-client quota counts as one.
            "limits": {"max_sessions_per_client": 1000},
            "fair_use": {"exempt": [LOOPBACK]},  # the load generator, not a person
        },
    )
    assert config["http_options"]["host"] == LOOPBACK, "the served proxy must bind loopback only"
    apply_deployment_overrides(config, overrides)
    try:
        runner.start(config, timeout_s=600)
        base_url = f"http://{LOOPBACK}:{replica_port if direct_ingress else port}"
        check_served_sam(base_url, checkpoint)
        yield base_url
    finally:
        runner.stop()


def check_served_sam(base_url: str, checkpoint: SamCheckpoint) -> None:
    """Fails unless both SAM deployments run exactly ``checkpoint`` (no silent tiny fallback)."""
    ready = httpx.get(f"{base_url}/readyz", timeout=60, trust_env=False).json()
    for name in ("sam_encoder", "sam_decoder"):
        info = ready["models"][name]
        if (info["model_type"], info["checkpoint_sha256"]) != (checkpoint.model_type,
                                                                checkpoint.sha256):
            raise RuntimeError(f"served {name} runs {info}, not {checkpoint.path}")


def decoder_replicas() -> int | None:
    """Running SamDecoder replicas (the decoder autoscales 1..2), for the record."""
    from ray import serve

    try:
        app = serve.status().applications["atelier3d"]
        states = app.deployments["SamDecoder"].replica_states
        return int(sum(n for state, n in states.items() if str(state).endswith("RUNNING")))
    except (KeyError, AttributeError):
        return None


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"baseline server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"baseline server not healthy after {timeout_s}s")


@contextlib.contextmanager
def baseline_system(checkpoint: SamCheckpoint, cache_dir: Path, threads: int) -> Iterator[str]:
    """``baseline_server.py`` in its own process; its log goes to the cache dir."""
    port = free_port()
    log_path = cache_dir / "baseline_server.log"
    command = [sys.executable, "-m", BASELINE_MODULE, "--checkpoint", str(checkpoint.path),
               "--cache-dir", str(cache_dir), "--port", str(port), "--threads", str(threads)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        base_url = f"http://{LOOPBACK}:{port}"
        wait_healthy(base_url, proc, timeout_s=300)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # a model call cannot be interrupted: stop it hard
            proc.kill()
            proc.wait(timeout=15)


async def open_session(base_url: str, png: bytes) -> tuple[str, float]:
    """Uploads and waits for the encode; on an idle server that is one encode's duration."""
    async with http_client(base_url, 2) as client:
        session_id, sample = await upload(client, png, time.perf_counter())
    if session_id is None:
        raise RuntimeError(f"upload failed with HTTP {sample.status}")
    return session_id, sample.latency_ms / 1000


# ---- phases ------------------------------------------------------------------------------------


def plan_for(args: argparse.Namespace, session_id: str, size: tuple[int, int],
             max_clicks: int | None = None, think_ms: float = 0.0,
             multimask: bool = True) -> dict:
    return {"session_id": session_id, "size": size, "think_s": think_ms / 1000,
            "max_clicks": max_clicks or args.max_clicks, "multimask": multimask}


def measured(coro, **meta) -> PhaseResult:
    """Runs one client phase, noting the CPU it and everything else on the machine used."""
    usage: dict = {}
    with cpu_meter(usage):
        phase = asyncio.run(coro)
    phase.meta.update(usage, **meta)
    return phase


def run_raw(args: argparse.Namespace, checkpoint: SamCheckpoint,
            image: np.ndarray) -> tuple[dict, RawDecoder]:
    """(a), for both graphs; returns the multimask decoder for the paired phase in (b)."""
    print("(a) raw decoder: encoding the photo in-process with vit_b ...", flush=True)
    embedding, encode_s = encode_in_process(checkpoint, image, args.threads)
    result: dict = {"encode_s": encode_s}
    decoders = {}
    # multimask=True is what every benchmark click asks for; the single-mask graph is the
    # reference for the one-mask served row (a 3x smaller response, see the overhead split).
    for multimask, key in ((True, ""), (False, "single_mask_")):
        onnx_path = cached_decoder_onnx(checkpoint, args.cache_dir, multimask=multimask)
        decoders[multimask] = RawDecoder(onnx_path, embedding, image.shape[:2], args.threads)
        usage: dict = {}
        with cpu_meter(usage):
            samples = raw_decoder_latency(decoders[multimask], args.raw_runs, args.seed)
        result.update({f"{key}onnx": onnx_path.name, f"{key}usage": usage,
                       f"{key}run_ms": percentiles(samples["run_ms"]),
                       f"{key}with_prompt_and_rle_ms":
                           percentiles(samples["with_prompt_and_rle_ms"]),
                       f"{key}samples": samples})
    return result, decoders[True]


def run_mixed(args: argparse.Namespace, base_url: str, session_id: str, size: tuple[int, int],
              pngs: list[bytes], interval_s: float) -> PhaseResult:
    print(f"   mixed: {args.mixed_users} users (think {args.mixed_think_ms:.0f} ms) + an upload "
          f"every {interval_s:.1f}s x{args.mixed_encodes} ...", flush=True)
    plan = plan_for(args, session_id, size, think_ms=args.mixed_think_ms)
    grace_s = args.grace_factor * interval_s + 30
    return measured(mixed_phase(base_url, plan, args.mixed_users, pngs, interval_s,
                                args.mixed_encodes, grace_s, args.seed + 1000))


def warm_up(base_url: str, args: argparse.Namespace, session_id: str,
            size: tuple[int, int]) -> None:
    """A few clicks first: the decoder fetches and caches the embedding, ORT sizes its arena."""
    for multimask in (True, False):
        plan = plan_for(args, session_id, size, max_clicks=5, multimask=multimask)
        asyncio.run(click_phase(base_url, plan, 1, 60, args.seed))


def run_served(args: argparse.Namespace, checkpoint: SamCheckpoint, size: tuple[int, int],
               pngs: list[bytes], raw: RawDecoder) -> tuple[dict, dict]:
    print("(b) served: starting the app on a local Ray ...", flush=True)
    summaries: dict = {"clicks": {}, "deployment_overrides": args.deployment}
    samples: dict = {}

    def record(key: str, label: str, phase: PhaseResult) -> dict:
        phase.meta.setdefault("decoder_replicas", decoder_replicas())
        samples[key] = [asdict(c) for c in phase.clicks]
        summary = phase_summary(phase)
        print(f"   {label}: {fmt(summary)}", flush=True)
        return summary

    with served_system(checkpoint, args.cache_dir, args.models, args.deployment,
                       args.direct_ingress) as base_url:
        usage: dict = {}
        with cpu_meter(usage):
            session_id, encode_s = asyncio.run(open_session(base_url, pngs[0]))
        summaries.update(encode_s_idle=encode_s, encode_usage=usage)
        print(f"   encoder: {encode_s:.1f}s per image on the idle server "
              f"(others used {usage['cpu_cores_used']['others']} cores)", flush=True)
        warm_up(base_url, args, session_id, size)
        for users in args.users:
            phase = measured(click_phase(base_url, plan_for(args, session_id, size), users,
                                         args.click_seconds, args.seed + users))
            summaries["clicks"][str(users)] = record(f"served_{users}", f"{users:>2} users", phase)
        single = measured(click_phase(base_url, plan_for(args, session_id, size, multimask=False),
                                      1, args.click_seconds, args.seed + 99))
        summaries["single_mask_1"] = record("served_1_single_mask", " 1 user, multimask=false",
                                            single)
        usage = {}
        with cpu_meter(usage):
            paired, raw_ms = asyncio.run(paired_phase(
                base_url, plan_for(args, session_id, size), raw, args.click_seconds,
                args.seed + 7))
        paired.meta.update(usage)
        summaries["paired_1"] = record("served_1_paired", " 1 user, paired with raw", paired)
        summaries["paired_1"]["raw_run_ms"] = percentiles(raw_ms)
        summaries["paired_raw_samples"] = raw_ms
        interval_s = args.upload_interval_s or encode_s
        summaries["upload_interval_s"] = interval_s
        mixed = run_mixed(args, base_url, session_id, size, pngs, interval_s)
        summaries["mixed"] = record("served_mixed", "mixed", mixed)
    return summaries, samples


def run_baseline(args: argparse.Namespace, checkpoint: SamCheckpoint, size: tuple[int, int],
                 pngs: list[bytes], interval_s: float) -> tuple[dict, dict]:
    print("(c) baseline: one process, one lock ...", flush=True)
    summaries: dict = {}
    samples: dict = {}
    with baseline_system(checkpoint, args.cache_dir, args.threads) as base_url:
        session_id, encode_s = asyncio.run(open_session(base_url, pngs[0]))
        summaries["encode_s_idle"] = encode_s
        print(f"   encode: {encode_s:.1f}s per image on the idle baseline", flush=True)
        warm_up(base_url, args, session_id, size)
        idle = measured(click_phase(base_url, plan_for(args, session_id, size), 1,
                                    args.baseline_idle_seconds, args.seed + 1))
        summaries["idle_1_user"] = phase_summary(idle)
        samples["baseline_1"] = [asdict(c) for c in idle.clicks]
        print(f"    1 user (idle): {fmt(summaries['idle_1_user'])}", flush=True)
        mixed = run_mixed(args, base_url, session_id, size, pngs, interval_s)
        summaries["mixed"] = phase_summary(mixed)
        samples["baseline_mixed"] = [asdict(c) for c in mixed.clicks]
        print(f"   mixed: {fmt(summaries['mixed'])}", flush=True)
    return summaries, samples


# ---- report ------------------------------------------------------------------------------------


def fmt(summary: dict) -> str:
    lat = summary["latency_ms"]
    if not lat.get("n"):
        return "no successful clicks"
    return (f"n={lat['n']} p50={lat['p50']:.1f} p95={lat['p95']:.1f} p99={lat['p99']:.1f} ms, "
            f"{summary['throughput_clicks_s']:.1f} clicks/s, errors={summary['errors']}, "
            f"CPU cores used by others {summary.get('cpu_cores_used', {}).get('others', '?')}"
            + upload_note(summary))


def upload_note(summary: dict) -> str:
    uploads = summary.get("uploads")
    if not uploads:
        return ""
    done = uploads["latency_ms"]
    took = f", upload->ready p50 {done['p50'] / 1000:.1f}s" if done.get("n") else ""
    return (f"; uploads sent {uploads['sent']}, ready {uploads['ok']}, still encoding at the "
            f"end {uploads['unfinished']}{took}")


def check_targets(results: dict) -> dict:
    """The served-p50 target from the paired phase (raw and served under the same load); the
    separate phases (a) and (b) are kept alongside for reference."""
    served = results["served"]
    paired = served["paired_1"]
    raw_p50, served_p50 = paired["raw_run_ms"]["p50"], paired["latency_ms"]["p50"]
    bound = SERVED_P50_FACTOR * raw_p50 + SERVED_P50_SLACK_MS
    one_user = served["clicks"].get("1", {}).get("latency_ms", {})
    targets = {"served_click_p50": {
        "served_p50_ms": served_p50, "raw_p50_ms": raw_p50, "bound_ms": bound,
        "met": bool(served_p50 <= bound),
        "unpaired_a_raw_p50_ms": results["raw"]["run_ms"]["p50"],
        "unpaired_b_served_1_user_p50_ms": one_user.get("p50")}}
    if "baseline" in results:
        served_p95 = served["mixed"]["latency_ms"].get("p95", float("nan"))
        baseline_p95 = results["baseline"]["mixed"]["latency_ms"].get("p95", float("nan"))
        ratio = baseline_p95 / served_p95
        targets["mixed_click_p95_ratio"] = {
            "served_p95_ms": served_p95, "baseline_p95_ms": baseline_p95, "ratio": ratio,
            "target": MIXED_P95_RATIO, "met": bool(ratio >= MIXED_P95_RATIO)}
    return targets


def overhead_breakdown(served_1: dict) -> dict:
    """Where a served click's time goes, from p50s of the client, Gateway and decoder clocks."""
    client = served_1["latency_ms"]["p50"]
    gateway = served_1["server_total_ms"]["p50"]
    decode = served_1["decode_ms"]["p50"]
    return {"client_ms": client,
            "decoder_session_run_ms": decode,
            "gateway_to_decoder_and_back_ms": gateway - decode,  # Ray hop, prompt, RLE, pydantic
            "proxy_http_client_ms": client - gateway,  # Serve proxy, HTTP, JSON, httpx
            "response_kib": served_1["response_kib_mean"]}


Row = tuple[str, dict, float | None, dict]  # name, latency percentiles, clicks/s, CPU usage


def table_rows(results: dict) -> list[Row]:
    raw, served = results["raw"], results["served"]

    def row(name: str, summary: dict) -> Row:
        return (name, summary["latency_ms"], summary["throughput_clicks_s"],
                summary.get("cpu_cores_used", {}))

    paired = served["paired_1"]
    rows: list[Row] = [
        ("(a) raw ORT decoder session.run", raw["run_ms"], None, raw["usage"]["cpu_cores_used"]),
        ("(a) raw decoder + prompt + RLE", raw["with_prompt_and_rle_ms"], None,
         raw["usage"]["cpu_cores_used"]),
        ("(a) raw session.run, multimask=false", raw["single_mask_run_ms"], None,
         raw["single_mask_usage"]["cpu_cores_used"]),
    ]
    rows += [row(f"(b) served, {users} user(s)", summary)
             for users, summary in served["clicks"].items()]
    rows += [row("(b) served, 1 user, multimask=false", served["single_mask_1"]),
             ("(a+b) paired: raw session.run", paired["raw_run_ms"], None,
              paired.get("cpu_cores_used", {})),
             row("(a+b) paired: served click, 1 user", paired),
             row("(c) mixed, served", served["mixed"])]
    if "baseline" in results:
        rows += [row("(c) mixed, baseline", results["baseline"]["mixed"]),
                 row("baseline, 1 user, idle", results["baseline"]["idle_1_user"])]
    return rows


def print_report(results: dict) -> None:
    print(f"\n{'phase':<38}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'clicks/s':>9}"
          f"{'others':>8}")
    for name, lat, throughput, usage in table_rows(results):
        rate = f"{throughput:>9.1f}" if throughput is not None else f"{'':>9}"
        print(f"{name:<38}{lat.get('n', 0):>6}{lat.get('p50', 0):>9.1f}"
              f"{lat.get('p95', 0):>9.1f}{lat.get('p99', 0):>9.1f}{rate}"
              f"{usage.get('others', float('nan')):>8.2f}")
    print("(others: CPU cores used by other processes on the machine during the phase)")
    if "baseline" in results:
        print_mixed_ratios(results["served"]["mixed"], results["baseline"]["mixed"])
    print("\nserved 1-user click p50 split (ms, from client/Gateway/decoder clocks):")
    for name, split in results["overhead_p50_ms"].items():
        print(f"  {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in split.items()))
    for name, target in results["targets"].items():
        print(f"target {name}: {'MET' if target['met'] else 'MISSED'} {json.dumps(target)}")


def print_mixed_ratios(served: dict, baseline: dict) -> None:
    print("\nmixed load, baseline / served:")
    for key in ("p50", "p95", "p99"):
        ratio = baseline["latency_ms"].get(key, float("nan")) / served["latency_ms"].get(
            key, float("nan"))
        print(f"  click {key}: {ratio:.1f}x lower on the served system")
    print(f"  throughput: served {served['throughput_clicks_s']:.1f} vs baseline "
          f"{baseline['throughput_clicks_s']:.1f} clicks/s")


def save_plot(results: dict, samples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, timeline) = plt.subplots(1, 2, figsize=(14, 5))
    curves = {"raw session.run": results["raw"]["samples"]["run_ms"],
              "raw session.run, paired": results["served"]["paired_raw_samples"]}
    for key, clicks in samples.items():
        curves[key.replace("_", " ")] = [c["latency_ms"] for c in clicks if c["status"] == 200]
    for label, values in curves.items():
        if values:
            xs = np.sort(values)
            cdf.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)
    cdf.set(xscale="log", xlabel="click latency (ms, log)", ylabel="fraction of clicks",
            title="Click latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=8)
    for key, color in (("served_mixed", "tab:blue"), ("baseline_mixed", "tab:red")):
        ok = [c for c in samples.get(key, []) if c["status"] == 200]
        timeline.scatter([c["t_s"] for c in ok], [c["latency_ms"] for c in ok], s=6,
                         color=color, label=key.replace("_", " "))
    for t in results["served"]["mixed"].get("upload_times_s", []):
        timeline.axvline(t, color="grey", linestyle=":", linewidth=1)
    timeline.set(yscale="log", xlabel="click start (s into the mixed phase; dotted: uploads)",
                 ylabel="click latency (ms, log)",
                 title=f"Mixed load: {results['config']['mixed_users']} users + uploads")
    timeline.grid(True, which="both", alpha=0.3)
    timeline.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="random vit_b checkpoint + ONNX cache (git-ignored)")
    parser.add_argument("--checkpoint", default=None,
                        help="a local SAM .pth to use instead of the random vit_b "
                             "(e.g. Meta's trained sam_vit_b_01ec64.pth)")
    parser.add_argument("--out-stem", default="sam_clicks",
                        help="writes benchmarks/results/<stem>.json and .png")
    parser.add_argument("--image", default="coffee", help="skimage photo for the clicks")
    parser.add_argument("--width", type=int, default=1024, help="resize the photo to this width")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/ORT threads for (a) and the baseline (local.yaml uses 1)")
    parser.add_argument("--raw-runs", type=int, default=50)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--click-seconds", type=float, default=10.0,
                        help="duration of each (b) concurrency level")
    parser.add_argument("--max-clicks", type=int, default=2000, help="per user and phase")
    parser.add_argument("--mixed-users", type=int, default=16)
    parser.add_argument("--mixed-think-ms", type=float, default=0.0,
                        help="mixed-phase user pause between a reply and the next click "
                             "(0: closed loop, every user clicks again at once; (b) always is)")
    parser.add_argument("--mixed-encodes", type=int, default=3,
                        help="uploads in the mixed phase; it lasts this many upload intervals")
    parser.add_argument("--upload-interval-s", type=float, default=None,
                        help="default: the served encoder's measured seconds per image")
    parser.add_argument("--grace-factor", type=float, default=2.0,
                        help="wait up to this many intervals (+30s) for clicks still in flight")
    parser.add_argument("--baseline-idle-seconds", type=float, default=5.0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--models", default="auto", choices=["auto", "real"],
                        help="the served app's models mode. auto: SAM still runs --checkpoint "
                             "(checked via /readyz), and deployments whose weights are not on "
                             "this offline machine (HumanParser's SegFormer) fall back to tiny "
                             "instead of failing the deploy as they do under real")
    parser.add_argument("--deployment", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="what-if: override the served deployments' sizing, e.g. "
                             "SamDecoder.max_ongoing_requests=1 (repeatable; default: none)")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="what-if: send (b) and (c) to the Gateway replica's own HTTP port "
                             "(Ray Serve's RAY_SERVE_ENABLE_DIRECT_INGRESS), not through the proxy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-load", type=float, default=None,
                        help="first wait (bounded) until the 1-min load average is below this")
    parser.add_argument("--wait-load-max-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    args.cache_dir = args.cache_dir.expanduser().resolve()
    return args


def wait_for_quiet(threshold: float | None, max_wait_s: float) -> None:
    """Other jobs share the machine: optionally start only once its load has dropped."""
    deadline = time.monotonic() + max_wait_s
    while threshold is not None and os.getloadavg()[0] >= threshold:
        if time.monotonic() > deadline:
            print(f"load still {load_average()} after {max_wait_s:.0f}s; running anyway")
            return
        time.sleep(5)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    wait_for_quiet(args.wait_load, args.wait_load_max_s)
    results: dict = {"machine": machine_info(), "config": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"load average at start: {results['machine']['load_average_start']}", flush=True)
    checkpoint = prepare_checkpoint(args.cache_dir, args.checkpoint)
    image = bench_image(args.image, args.width)
    # Other photos at the same width for the mixed phase's uploads (distinct images, same cost).
    pngs = [png_bytes(image)] + [png_bytes(bench_image(name, args.width))
                                 for name in ("astronaut", "chelsea")]
    results["image"] = {"name": args.image, "height": image.shape[0], "width": image.shape[1]}
    results["raw"], raw_decoder = run_raw(args, checkpoint, image)
    print(f"   encode {results['raw']['encode_s']:.1f}s; session.run "
          f"p50={results['raw']['run_ms']['p50']:.1f} ms", flush=True)
    results["served"], samples = run_served(args, checkpoint, image.shape[:2], pngs, raw_decoder)
    if not args.skip_baseline:
        results["baseline"], baseline_samples = run_baseline(
            args, checkpoint, image.shape[:2], pngs, results["served"]["upload_interval_s"])
        samples.update(baseline_samples)
    results["machine"]["load_average_end"] = load_average()
    results["overhead_p50_ms"] = {
        "multimask": overhead_breakdown(results["served"]["paired_1"]),
        "single_mask": overhead_breakdown(results["served"]["single_mask_1"])}
    results["targets"] = check_targets(results)
    results["samples"] = samples
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{args.out_stem}.json"
    json_path.write_text(json.dumps(results, indent=1))
    print_report(results)
    save_plot(results, samples, RESULTS_DIR / f"{args.out_stem}.png")
    print(f"\nresults: {json_path} (+ .png); load average at end: "
          f"{results['machine']['load_average_end']}")
    return results


if __name__ == "__main__":
    main()
