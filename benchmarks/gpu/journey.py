"""The whole app on a GPU, measured: a user's journey through HTTP, each stage next to the same
model called directly, GPU memory per replica next to the profile's plan, then mixed users.

1. **Weights**: full-size random weights for the five models, written once in their official
   layouts under ``--weights-dir``: SAM vit_h (``.pth``; the SamDecoder's ONNX graph is exported
   from it), SegFormer-B2 (ATR 18), Qwen-Image-Edit (transformer 20.4 B, Qwen2.5-VL-7B text
   encoder, VAE; built on the GPU in bf16, ~58 GB on disk) with a random Lightning 8-step LoRA
   in the published key layout (rank 4), Hunyuan3D-2mini (DiT 0.6 B, DINOv2-giant, ShapeVAE;
   its field shaped as in ``mesh_gpu.py``). BlazePose is mediapipe's real models (``--pose``).
2. **Direct**: each model deployment's class built in this process on those weights (the code a
   replica runs, without Serve, HTTP or the Gateway), each stage timed after a warm-up.
3. **Served**: the profile ``atelier3d serve`` picks for this machine's GPUs
   (``hardware.choose_profile``) with ``models: real`` on the weights above, the edit in nf4
   (transformer and text encoder) with the Lightning LoRA, FlashVDM off, projected texture, no
   UI, loopback exempt from fair use (every simulated user shares one address), started as
   ``atelier3d serve`` does (``runner.start``). The journey, with ``atelier3d.clients.Client``:
   upload (encode), 20 clicks on one object, a parse, an edit (1024x1024, 8 steps), a mesh
   (octree 256, of the character's RGBA). Twice: the first warms up; the second is reported.
4. **GPU memory** per replica: each Serve replica's process in nvidia-smi
   (``hardware.gpu_memory_by_process``), next to its ``num_gpus`` fraction of the card.
5. **Mixed users**: 8 clicking, 2 editing and 1 meshing, each with a session of its own, for
   ``--mixed-s`` seconds: p50/p95 per request class.

Random SAM weights make meaningless masks: the parse and the mesh use the drawn character's own
mask (``samples.drawn_character_labels``), so every stage runs whatever SAM answers.

Run: ``python benchmarks/gpu/journey.py`` (JSON to ``$OUT/journey_gpu.json`` when ``$OUT`` is
set, else benchmarks/results/). ``--dry-run``: the same code on the CPU with the tiny checkpoints
(``atelier3d models make-tiny``), the local CPU profile, small sizes and durations; writes
``journey_dry_run.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # atelier3d and benchmarks from this checkout

from atelier3d import hardware  # noqa: E402
from atelier3d.clients.client import ApiError, Client  # noqa: E402
from atelier3d.config import AppConfig  # noqa: E402
from atelier3d.models.parse.pose import POSE_SOURCE, resolve_pose_weights  # noqa: E402
from atelier3d.samples import drawn_character, drawn_character_labels  # noqa: E402
from atelier3d.serve import runner  # noqa: E402
from benchmarks.common import (  # noqa: E402
    LOOPBACK,
    RESULTS_DIR,
    free_port,
    machine_info,
    percentiles,
    replica_pids,
)

PROMPT = "make the shirt red"
USERS = {"click": 8, "edit": 2, "mesh": 1}
FULL_SAM = "sam_vit_h_random.pth"  # "random": loaded as untrained; "vit_h": its architecture


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the journey's request sizes and the load's duration."""

    edit_size: int
    octree: int
    mesh_steps: int | None  # None: the profile's default
    mixed_s: float
    clicks: int = 20
    edit_steps: int = 8  # the Lightning LoRA's
    direct_runs: int = 2  # after one warm-up
    users: dict[str, int] = field(default_factory=lambda: dict(USERS))


GPU_SIZES = Sizes(edit_size=1024, octree=256, mesh_steps=None, mixed_s=60.0)
DRY_SIZES = Sizes(edit_size=256, octree=64, mesh_steps=4, mixed_s=6.0, direct_runs=1)


@dataclass(frozen=True)
class Weights:
    """Where each model's weights are, as the config names them."""

    sam: str
    segformer: str
    edit: str
    lightning: str
    mesh: str
    mesh_subfolder: str
    pose: str


# ---- weights ------------------------------------------------------------------------------------


def tiny_weights(root: Path, pose: str) -> Weights:
    """The tiny checkpoints ``atelier3d models make-tiny --dir root`` writes (written once)."""
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir
    from atelier3d.models.mesh.hunyuan3d import TINY_SUBFOLDER, tiny_shape3d_dir
    from atelier3d.models.parse.segformer import tiny_segformer_dir
    from atelier3d.models.segment.sam import tiny_checkpoint

    return Weights(sam=str(tiny_checkpoint(root).path), segformer=str(tiny_segformer_dir(root)),
                   edit=str(tiny_edit_dir(root)), lightning=str(tiny_lightning_dir(root)),
                   mesh=str(tiny_shape3d_dir(root)), mesh_subfolder=TINY_SUBFOLDER, pose=pose)


def full_weights(root: Path, pose: str) -> Weights:
    """Full-size random weights in the official layouts, each written once (a file written
    last marks it complete), built on the GPU where they are large."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    from atelier3d.models.edit.lightning import EDIT_FILES, lightning_state_dict
    from atelier3d.models.edit.qwen_image_edit import EditSizes, write_random_edit_pipeline
    from atelier3d.models.mesh.hunyuan3d import save_random_shape3d
    from atelier3d.models.parse.segformer import write_random_segformer_b2
    from atelier3d.models.segment.sam import write_random_checkpoint
    from benchmarks.edit import FULL_CONFIG, FULL_TEXT, FULL_VAE, FULL_VISION
    from benchmarks.gpu.mesh_gpu import ARCHS, build, shape_the_field

    def once(path: Path, marker: str, write: Callable[[], object]) -> Path:
        if not (path / marker).exists():
            started = time.perf_counter()
            write()
            print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
        return path

    sam = root / "sam" / FULL_SAM
    if not sam.exists():
        write_random_checkpoint(sam, "vit_h")
    segformer = once(root / "parsing" / "segformer-b2-random", "model.safetensors",
                     lambda: write_random_segformer_b2(root / "parsing" / "segformer-b2-random"))
    edit = once(root / "editing" / "qwen-image-edit-random", "model_index.json",
                lambda: write_random_edit_pipeline(
                    root / "editing" / "qwen-image-edit-random",
                    EditSizes(FULL_CONFIG, FULL_VAE, FULL_TEXT, FULL_VISION),
                    dtype=torch.bfloat16, device="cuda"))
    torch.cuda.empty_cache()
    lightning = root / "editing" / "qwen-image-lightning-random"
    if not (lightning / EDIT_FILES[1]).exists():
        with torch.device("meta"):  # the LoRA needs the layers' shapes only
            transformer = QwenImageTransformer2DModel(**FULL_CONFIG)
        lightning.mkdir(parents=True, exist_ok=True)
        save_file(lightning_state_dict(transformer, seed=0), str(lightning / EDIT_FILES[1]))
    arch = "hunyuan3d-dit-v2-mini"
    mesh = root / "hunyuan3d" / "hunyuan3d-2mini-random"

    def write_mesh() -> None:
        model = build(ARCHS[arch], "cuda", torch.float16)
        shape_the_field(model, character_rgba())
        save_random_shape3d(model.pipeline, ARCHS[arch], mesh / arch)

    once(mesh / arch, "config.yaml", write_mesh)
    torch.cuda.empty_cache()
    return Weights(sam=str(sam), segformer=str(segformer), edit=str(edit),
                   lightning=str(lightning), mesh=str(mesh), mesh_subfolder=arch, pose=pose)


def character_rgba() -> np.ndarray:
    """The drawn character with its own mask as alpha: what the mesh stage gets."""
    return np.dstack([drawn_character(), (drawn_character_labels() > 0).astype(np.uint8) * 255])


# ---- the served config --------------------------------------------------------------------------


def serve_config(weights: Weights, profile: Path, port: int, cache: Path, gpu: bool) -> dict:
    """``profile`` (a packaged Serve YAML) with ``models: real`` on ``weights``."""
    quantization = "bitsandbytes_4bit" if gpu else "none"  # bitsandbytes needs CUDA
    return runner.load_serve_config(profile, models="real", port=port, args_override={
        "cache_dir": str(cache),
        "ui": False,
        "fair_use": {"exempt": [LOOPBACK]},
        "sam": {"checkpoint": weights.sam},
        "parsing": {"segformer": weights.segformer, "pose": weights.pose},
        "edit": {"model": weights.edit, "plus_model": None, "quantization": quantization,
                 "text_encoder_quantization": quantization,
                 "lightning_lora": {"weights": weights.lightning}},
        # Paint's weights are not part of this run (nor random-weight stand-ins of them).
        "mesh": {"model": weights.mesh, "subfolder": weights.mesh_subfolder, "flashvdm": False,
                 "texture": "project"},
    })


def memory_plan(config: dict, card_mib: float | None) -> dict[str, dict]:
    """Each deployment's ``num_gpus`` share of the card, per replica, as the profile plans it."""
    app = config["applications"][0]
    return {d["name"]: {
        "replicas": d.get("num_replicas", 1),
        "num_gpus": (d.get("ray_actor_options") or {}).get("num_gpus", 0),
        "planned_mib_per_replica": (None if card_mib is None else round(
            (d.get("ray_actor_options") or {}).get("num_gpus", 0) * card_mib)),
    } for d in app["deployments"]}


def replica_gpu_memory(plan: dict[str, dict]) -> dict[str, Any]:
    """GPU memory of each replica's process now, next to its plan; None per replica on a
    machine without a GPU. Processes on the card that are no replica are summed as others."""
    usage = hardware.gpu_memory_by_process()
    pids = replica_pids()
    replicas = {}
    for name, planned in plan.items():
        measured = [None if usage is None else usage.get(pid, 0.0) for pid in pids.get(name, [])]
        replicas[name] = {**planned, "measured_mib": measured}
    ours = {pid for group in pids.values() for pid in group}
    others = None if usage is None else sum(v for pid, v in usage.items() if pid not in ours)
    return {"replicas": replicas, "other_processes_mib": others}


# ---- direct: the deployments' classes in this process -------------------------------------------


async def drain(events: AsyncIterator[dict]) -> dict:
    """The result event of a job model's stream."""
    result = None
    async for event in events:
        if event["type"] == "result":
            result = event
    if result is None:
        raise RuntimeError("the stream ended without a result")
    return result


def direct_stages(args: dict, sizes: Sizes) -> dict[str, dict]:
    """Each stage through its deployment's class built here, one model at a time (loaded, timed,
    freed: the card holds the served replicas' copies later)."""
    import torch

    from atelier3d.deployments.edit import ImageEditor
    from atelier3d.deployments.mesh import Shape3D
    from atelier3d.deployments.parse import HumanParser
    from atelier3d.deployments.segment_decoder import SamDecoder
    from atelier3d.deployments.segment_encoder import SamEncoder
    from atelier3d.serve.app import model_slice
    from atelier3d.stages.edit import EditRequest
    from atelier3d.stages.mesh import MeshRequest
    from atelier3d.stages.segment import decoder_prompt, mask_candidates

    config = AppConfig.model_validate(args)
    image, mask = drawn_character(), drawn_character_labels() > 0
    out: dict[str, dict] = {}

    def record(stage: str, build: Callable[[], Any], call: Callable[[Any], Any]) -> Any:
        """Loads the model, calls it once to warm up, then times ``sizes.direct_runs`` calls;
        returns the last call's output. The model is freed on return."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the previous stage's model held
        started = time.perf_counter()
        model = build()
        load_s = time.perf_counter() - started
        output = call(model)
        times = []
        for _ in range(sizes.direct_runs):
            started = time.perf_counter()
            output = call(model)
            times.append(time.perf_counter() - started)
        out[stage] = {"load_s": load_s, "s": times, "p50_s": float(np.median(times))}
        print(f"direct {stage}: {np.median(times):.3f} s (load {load_s:.1f} s)", flush=True)
        return output

    embedding = record("encode", lambda: SamEncoder.func_or_class(model_slice(config, "sam")),
                       lambda encoder: encoder._encode_batch([image]))[0]
    rng = np.random.default_rng(0)
    ys, xs = np.nonzero(mask)
    points = [(float(xs[i]), float(ys[i])) for i in rng.integers(0, len(xs), 1)]

    def click(decoder: Any) -> object:
        prompt = decoder_prompt(image.shape[:2], np.asarray(points), np.ones(1, np.int64),
                                None, None)
        masks, scores, _ = decoder._run(True, embedding, prompt)
        return mask_candidates(masks[0], scores[0])

    def decoder_model() -> Any:
        decoder = SamDecoder.func_or_class(model_slice(config, "sam"))
        decoder.reconfigure({})
        return decoder

    record("click", decoder_model, click)
    record("parse", lambda: HumanParser.func_or_class(model_slice(config, "parsing")),
           lambda m: m.parse(image, mask))

    def edit(editor: Any) -> object:
        request = EditRequest.build(editor.pipes.settings, images=[image], prompt=PROMPT,
                                    steps=sizes.edit_steps, width=sizes.edit_size,
                                    height=sizes.edit_size)
        return asyncio.run(drain(editor.edit(request)))

    record("edit", lambda: ImageEditor.func_or_class(model_slice(config, "edit")), edit)

    def mesh(shape3d: Any) -> object:
        request = MeshRequest.build(image=character_rgba(), steps=sizes.mesh_steps,
                                    octree_resolution=sizes.octree)
        return asyncio.run(drain(shape3d.generate(request)))

    record("mesh", lambda: Shape3D.func_or_class(model_slice(config, "mesh")), mesh)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ---- served: the journey through HTTP -----------------------------------------------------------


def click_points(n: int, seed: int) -> list[tuple[float, float]]:
    """``n`` points on the drawn character, as a person clicking on it would place them."""
    ys, xs = np.nonzero(drawn_character_labels() > 0)
    picks = np.random.default_rng(seed).integers(0, len(xs), n)
    return [(float(xs[i]), float(ys[i])) for i in picks]


def run_job(client: Client, submitted: Any) -> None:
    state = client.wait_job(submitted.job_id)
    if state.status != "succeeded":
        raise RuntimeError(f"{state.kind} job {state.job_id} {state.status}: {state.error}")
    client.job_result(state.job_id)


def edit_job(client: Client, session_id: str, sizes: Sizes, seed: int = 0) -> None:
    run_job(client, client.submit_edit(session_id, prompt=PROMPT, steps=sizes.edit_steps,
                                       width=sizes.edit_size, height=sizes.edit_size, seed=seed))


def mesh_job(client: Client, rgba: np.ndarray, sizes: Sizes, seed: int = 0) -> None:
    params = {"octree_resolution": sizes.octree, "seed": seed}
    if sizes.mesh_steps is not None:
        params["steps"] = sizes.mesh_steps
    run_job(client, client.submit_mesh(image=rgba, **params))


def journey(client: Client, sizes: Sizes) -> dict[str, Any]:
    """One user's journey; seconds per stage (the clicks' list and p50)."""
    image, mask = drawn_character(), drawn_character_labels() > 0
    stages: dict[str, Any] = {}

    def clock(stage: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = call()
        stages[stage] = time.perf_counter() - started
        return result

    session = clock("encode", lambda: client.create_session(image, wait=True))
    obj = client.create_object(session.session_id)
    points, clicks = [], []
    for point in click_points(sizes.clicks, seed=1):
        points.append(point)  # each click adds a point to the object, as in the UI
        started = time.perf_counter()
        client.segment(session.session_id, points=points[-16:], object_id=obj.object_id)
        clicks.append(time.perf_counter() - started)
    stages["click"] = {"s": clicks, "p50_s": float(np.median(clicks))}
    clock("parse", lambda: client.parse(session.session_id, rle=mask))
    clock("edit", lambda: edit_job(client, session.session_id, sizes))
    clock("mesh", lambda: mesh_job(client, character_rgba(), sizes))
    client.delete_session(session.session_id)
    return stages


def mixed_users(base_url: str, sizes: Sizes) -> dict[str, Any]:
    """``sizes.users`` users at once for ``sizes.mixed_s`` seconds, each with its own session:
    latency per request class (a request under way at the end is waited for)."""
    latencies: dict[str, list[float]] = {kind: [] for kind in sizes.users}
    errors: dict[str, list[str]] = {kind: [] for kind in sizes.users}
    clock: list[float] = []  # the start and the deadline, set once every user has a session
    ready = threading.Barrier(sum(sizes.users.values()), action=lambda: clock.extend(
        [time.perf_counter(), time.perf_counter() + sizes.mixed_s]))

    failures: list[str] = []

    def user(kind: str, index: int) -> None:
        try:
            one_user(kind, index)
        except Exception as exc:  # noqa: BLE001 - reported below, after every thread ended
            failures.append(f"{kind} user {index}: {exc!r}"[:300])
            ready.abort()  # the others must not wait at the start for this one

    def one_user(kind: str, index: int) -> None:
        with Client(base_url, timeout=1800) as client:
            session = client.create_session(drawn_character(), wait=True)
            obj = client.create_object(session.session_id)
            points = click_points(64, seed=100 + index)
            rgba = character_rgba()
            ready.wait()
            n = 0
            while time.perf_counter() < clock[1]:
                started = time.perf_counter()
                try:
                    if kind == "click":
                        client.segment(session.session_id, points=[points[n % len(points)]],
                                       object_id=obj.object_id)
                    elif kind == "edit":
                        edit_job(client, session.session_id, sizes, seed=index * 1000 + n)
                    else:
                        mesh_job(client, rgba, sizes, seed=n)
                except (ApiError, RuntimeError) as exc:
                    errors[kind].append(str(exc)[:200])
                    continue
                finally:
                    n += 1
                latencies[kind].append(time.perf_counter() - started)
            client.delete_session(session.session_id)

    threads = [threading.Thread(target=user, args=(kind, i), daemon=True)
               for kind, count in sizes.users.items() for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("mixed users failed: " + "; ".join(failures))
    elapsed = time.perf_counter() - clock[0]
    return {"users": sizes.users, "duration_s": sizes.mixed_s, "elapsed_s": elapsed,
            "classes": {kind: {**percentiles(values), "per_s": len(values) / elapsed,
                               "errors": len(errors[kind]), "first_errors": errors[kind][:3]}
                        for kind, values in latencies.items()}}


def served(config: dict, sizes: Sizes, gpu: bool) -> dict[str, Any]:
    """Starts the app as ``atelier3d serve`` does, runs the journey twice and the mixed users,
    with GPU memory per replica after the journeys; stops it."""
    port = config["http_options"]["port"]
    card = hardware.detect_gpus() if gpu else []
    plan = memory_plan(config, card[0].memory_mib if card else None)
    started = time.perf_counter()
    runner.start(config, num_gpus=None if gpu else 0)  # None: Ray counts the GPUs
    out: dict[str, Any] = {"start_s": time.perf_counter() - started}
    print(f"served in {out['start_s']:.0f} s", flush=True)
    try:
        base_url = f"http://{LOOPBACK}:{port}"
        with Client(base_url, timeout=1800) as client:
            out["models"] = {name: info.model_dump() for name, info in
                             client.ready().models.items()}
            out["journey_warmup"] = journey(client, sizes)
            out["journey"] = journey(client, sizes)
        print("journey: " + ", ".join(
            f"{stage} {v['p50_s'] if isinstance(v, dict) else v:.3f} s"
            for stage, v in out["journey"].items()), flush=True)
        out["gpu_memory"] = replica_gpu_memory(plan)
        out["mixed"] = mixed_users(base_url, sizes)
        print("mixed: " + ", ".join(
            f"{kind} p50 {c.get('p50', float('nan')):.3f} s p95 {c.get('p95', float('nan')):.3f} "
            f"s (n {c['n']}, errors {c['errors']})" for kind, c in out["mixed"]["classes"].items()),
            flush=True)
        out["gpu_memory_after_mixed"] = replica_gpu_memory(plan)
    finally:
        runner.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny checkpoints, the local profile, small sizes")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="where the random weights are written once (default: "
                        ".cache/journey-full, with --dry-run .cache/bench)")
    parser.add_argument("--pose", default=None,
                        help=f"BlazePose models: a directory, a mediapipe .whl or {POSE_SOURCE} "
                        "(default: that, extracted under the weights dir)")
    parser.add_argument("--mixed-s", type=float, default=None, help="mixed users' duration")
    parser.add_argument("--skip-direct", action="store_true", help="served stages only")
    args = parser.parse_args()

    # Serve's replicas import atelier3d from this checkout too (Ray workers inherit this).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")]))
    gpu = not args.dry_run
    if gpu and not hardware.detect_gpus():
        print("no GPU found: run with --dry-run on the CPU", file=sys.stderr)
        return 2
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.mixed_s is not None:
        sizes = Sizes(**{**asdict(sizes), "mixed_s": args.mixed_s})
    root = (args.weights_dir or REPO / ".cache" / ("bench" if args.dry_run else "journey-full")
            ).resolve()
    pose = args.pose or str(resolve_pose_weights(POSE_SOURCE, root).detector.parent)
    profile = hardware.choose_profile(hardware.detect_gpus() if gpu else [])
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "weights": "tiny random" if args.dry_run else
        "full-size random", "machine": machine_info(), "gpus": [
            g.model_dump() for g in (hardware.detect_gpus() if gpu else [])],
        "profile": profile.model_dump(), "sizes": asdict(sizes),
    }
    print(profile.reason, flush=True)
    started = time.perf_counter()
    weights = tiny_weights(root, pose) if args.dry_run else full_weights(root, pose)
    report["weights_s"] = time.perf_counter() - started
    # Relative to the checkout where inside it: the report names no machine's directories.
    report["weights_paths"] = {name: str(Path(value).relative_to(REPO))
                               if Path(value).is_relative_to(REPO) else value
                               for name, value in asdict(weights).items()}
    # The weights' root is the serve cache too: the ONNX decoder exported there once is reused.
    config = serve_config(weights, runner.packaged_config_path(profile.file), free_port(), root,
                          gpu)
    args_of_app = config["applications"][0]["args"]
    if not args.skip_direct:
        report["direct"] = direct_stages(args_of_app, sizes)
    report["served"] = served(config, sizes, gpu)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "journey_dry_run.json" if args.dry_run else "journey_gpu.json"
    (out_dir / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
