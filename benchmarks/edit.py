"""Qwen-Image-Edit's transformer on CPU: time per denoising step and peak memory, none vs
torchao_int8wo.

Two transformers, random weights (``QwenImageTransformer2DModel`` built from its config):

- ``tiny``: the tiny profile's (``models.edit.qwen_image_edit.TINY_TRANSFORMER``), what the tests
  and a CPU-only server run;
- ``full-width-1-block``: the real model's widths (24 heads x 128, joint_attention_dim 3584,
  in 64) with one of its 60 blocks: a real step costs about 60 times this block.

A step is one transformer forward on what the edit pipeline feeds it: the output's latent patches
and the condition image's (``--size`` px each, 1/16 per side), plus ``--text-tokens`` of prompt
hidden states. True CFG (``true_cfg_scale > 1``) runs two forwards per step. ``torchao_int8wo``
is ``quantize_(model, Int8WeightOnlyConfig())``, the transform diffusers' ``TorchAoConfig``
applies at load (tests/test_edit.py checks they give the same pixels).

Memory is the process's resident set from /proc/self/status (tracemalloc does not see torch's
allocations); each case runs in a fresh process: ``build_peak`` is the high-water mark (VmHWM)
while building + quantizing (here the float32 weights exist before ``quantize_``; a torchao load
quantizes as it goes), ``loaded`` the RSS after, then the mark is reset (``clear_refs``) and
``step_peak`` is the high-water mark over the steps: the weights plus a step's activations and
dequantized weights. Weights are the bytes of the parameters as stored (quantized tensors' int8
data and scales).

Prints a table, writes ``benchmarks/results/edit.json``. Run: ``.venv/bin/python -m
benchmarks.edit`` (about 2 minutes on 2 cores). Not a test.

``--served URL``: whole edits, served vs direct, on the tiny pipeline (``--models tiny``). The
drawn character (``atelier3d.samples.drawn_character()``) is uploaded once (``POST
/v1/sessions?wait=true``); each served edit is ``POST /v1/jobs/edit`` (``--edit-size`` square,
``--edit-steps`` steps, the server's default true CFG), then ``GET /v1/jobs/{id}/events`` read
to the end, ``GET /v1/jobs/{id}`` (the server's ``stage_ms``) and ``GET /v1/jobs/{id}/result``:
timed from submit to the PNG in hand. Each direct edit is the same request through the
ImageEditor deployment's class in this process (``ImageEditor.func_or_class({"models":
"tiny"})``: the same loader, 1 torch thread, lock, worker thread and PNG encode as a replica),
timed from ``EditRequest.build`` to the result event. Served and direct runs alternate, so both
see the same machine load; overhead = served - direct. Writes
``benchmarks/results/edit_served.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from atelier3d.models.loading import default_dtype
from benchmarks.common import REPO, RESULTS_DIR, percentiles, png_bytes

RESULTS = RESULTS_DIR / "edit.json"
# Qwen/Qwen-Image-Edit's transformer/config.json (20.4 B parameters).
FULL_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                   axes_dims_rope=(16, 56, 56))
# The rest of Qwen/Qwen-Image-Edit at full size: vae/config.json (AutoencoderKLQwenImage's
# defaults are that config) and text_encoder/config.json, Qwen2.5-VL-7B (8.3 B parameters).
FULL_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True])
FULL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 max_position_embeddings=128000, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                  "mrope_section": [16, 24, 24]})
FULL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112)


def model_configs() -> dict[str, dict]:
    from atelier3d.models.edit.qwen_image_edit import TINY_TRANSFORMER

    return {"tiny": TINY_TRANSFORMER, "full-width-1-block": FULL_CONFIG | {"num_layers": 1}}


def build_transformer(config: dict, dtype: Any, device: str, seed: int = 0) -> Any:
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        return QwenImageTransformer2DModel(**config).eval()


def transformer_inputs(config: dict, size: int, text_tokens: int, dtype: Any, device: str,
                       seed: int = 0) -> dict[str, Any]:
    """One step's inputs, shaped as QwenImageEditPipeline passes them."""
    import torch

    side = size // 16  # 8x VAE downsampling, then 2x2 patches
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    return dict(
        hidden_states=randn(1, 2 * side * side, config["in_channels"]),  # output + condition
        encoder_hidden_states=randn(1, text_tokens, config["joint_attention_dim"]),
        encoder_hidden_states_mask=torch.ones(1, text_tokens, dtype=torch.long, device=device),
        timestep=torch.full((1,), 0.5, dtype=dtype, device=device),
        img_shapes=[[(1, side, side), (1, side, side)]],
        return_dict=False,
    )


def time_steps(model: Any, inputs: dict, runs: int, warmup: int,
               sync: Any = lambda: None) -> tuple[list[float], Any]:
    """``warmup`` untimed forwards, then ``runs`` timed ones (ms); also the last output."""
    import torch

    times, out = [], None
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            out = model(**inputs)[0]
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return times, out


def tensor_bytes(tensor: Any) -> int:
    """Storage bytes, through tensor subclasses (torchao's quantized tensors) to their parts."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: Any) -> int:
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark) of this process, MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def run_case(model_name: str, quantization: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    config = model_configs()[model_name]
    model = build_transformer(config, torch.float32, "cpu")
    if quantization == "torchao_int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    inputs = transformer_inputs(config, args.size, args.text_tokens, torch.float32, "cpu")
    gc.collect()
    build_peak, loaded = rss_mib("VmHWM"), rss_mib("VmRSS")
    reset_peak_rss()
    times, _ = time_steps(model, inputs, args.runs, args.warmup)
    return {
        "model": model_name, "quantization": quantization,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "weights_mib": weight_bytes(model) / 2**20,
        "tokens": inputs["hidden_states"].shape[1] + args.text_tokens,
        "step_ms": {"p50": float(np.median(times)), "min": min(times), "max": max(times),
                    "samples": times},
        "rss_mib": {"build_peak": build_peak, "loaded": loaded, "step_peak": rss_mib("VmHWM")},
    }


def direct_editor() -> Any:
    """The ImageEditor deployment's class, built in this process on the tiny pipeline."""
    from atelier3d.deployments.edit import ImageEditor

    return ImageEditor.func_or_class({"models": "tiny"})


def direct_edit(editor: Any, image: np.ndarray, params: dict) -> dict:
    """One edit through ``editor.edit`` (what a replica runs), from request to result (ms)."""
    import asyncio

    from atelier3d.stages.edit import EditRequest

    async def run() -> dict:
        start = time.perf_counter()
        request = EditRequest.build(editor.pipes.settings, images=[image], **params)
        result = None
        async for event in editor.edit(request):
            if event["type"] == "result":
                result = event
        assert result is not None and result["media_type"] == "image/png"
        return {"total_ms": (time.perf_counter() - start) * 1000, "png_bytes": len(result["data"]),
                "timings_ms": result["meta"]["timings_ms"]}

    return asyncio.run(run())


def served_session(http: Any, image: np.ndarray) -> str:
    r = http.post("/v1/sessions", params={"wait": "true"},
                  files={"image": ("drawn.png", png_bytes(image), "image/png")})
    r.raise_for_status()
    return r.json()["session_id"]


def served_edit(http: Any, session_id: str, params: dict) -> dict:
    """One edit job: submit, follow its events to the end, read its state and its PNG (ms)."""
    start = time.perf_counter()
    r = http.post("/v1/jobs/edit", json={"session_id": session_id, **params})
    r.raise_for_status()
    job_id = r.json()["job_id"]
    submitted = time.perf_counter()
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        lines = [line for line in events.iter_lines() if line.strip()]
    ended = time.perf_counter()
    state = http.get(f"/v1/jobs/{job_id}").json()
    if state["status"] != "succeeded":
        raise RuntimeError(f"edit job {job_id} {state['status']}: {state.get('error')}")
    result = http.get(f"/v1/jobs/{job_id}/result")
    result.raise_for_status()
    done = time.perf_counter()
    meta = state.get("result_meta") or {}
    return {"total_ms": (done - start) * 1000, "submit_ms": (submitted - start) * 1000,
            "events_end_ms": (ended - start) * 1000, "events": len(lines),
            "png_bytes": len(result.content),
            "queue_ms": (state["started_at"] - state["created_at"]) * 1000,
            "server_job_ms": (state["finished_at"] - state["created_at"]) * 1000,
            "run_ms": (state["finished_at"] - state["started_at"]) * 1000,
            "stage_ms": state.get("stage_ms", {}), "timings_ms": meta.get("timings_ms", {})}


def served_vs_direct(args: argparse.Namespace) -> int:
    import httpx

    from atelier3d.samples import drawn_character

    image = drawn_character()
    params = {"prompt": "make the shirt red", "steps": args.edit_steps, "width": args.edit_size,
              "height": args.edit_size}
    editor = None if args.no_direct else direct_editor()
    served, direct = [], []
    with httpx.Client(base_url=args.served, timeout=600) as http:
        session_id = served_session(http, image)
        served_edit(http, session_id, {**params, "seed": 0})  # warm-up
        if editor is not None:
            direct_edit(editor, image, {**params, "seed": 0})
        for seed in range(1, args.edit_runs + 1):
            served.append(served_edit(http, session_id, {**params, "seed": seed}))
            if editor is not None:
                direct.append(direct_edit(editor, image, {**params, "seed": seed}))
    out: dict = {"served_total_ms": percentiles([r["total_ms"] for r in served]),
                 "served_server_job_ms": percentiles([r["server_job_ms"] for r in served]),
                 "served_queue_ms": percentiles([r["queue_ms"] for r in served]),
                 "served_run_ms": percentiles([r["run_ms"] for r in served]),
                 "served_replica_total_ms": percentiles([r["timings_ms"]["total_ms"]
                                                         for r in served]),
                 "served_stage_ms": {k: percentiles([r["stage_ms"].get(k, 0.0) for r in served])
                                     for k in served[0]["stage_ms"]}}
    rows = [("served: submit -> PNG in hand", out["served_total_ms"]),
            ("served: server created -> finished", out["served_server_job_ms"]),
            ("served: server queued (created -> started)", out["served_queue_ms"]),
            ("served: replica run_edit total_ms", out["served_replica_total_ms"])]
    rows += [(f"served: stage_ms[{k}]", v) for k, v in out["served_stage_ms"].items()]
    out["served_http_ms"] = percentiles([r["total_ms"] - r["server_job_ms"] for r in served])
    out["served_gateway_ms"] = percentiles([r["server_job_ms"] - r["timings_ms"]["total_ms"]
                                            for r in served])
    rows += [("served: client - server job (HTTP, 3 calls)", out["served_http_ms"]),
             ("served: server job - replica run_edit", out["served_gateway_ms"])]
    if direct:
        out["direct_total_ms"] = percentiles([r["total_ms"] for r in direct])
        out["direct_run_edit_total_ms"] = percentiles([r["timings_ms"]["total_ms"] for r in direct])
        out["overhead_ms"] = percentiles([s["total_ms"] - d["total_ms"]
                                          for s, d in zip(served, direct, strict=True)])
        rows += [("direct: ImageEditor.edit in-process", out["direct_total_ms"]),
                 ("direct: run_edit total_ms", out["direct_run_edit_total_ms"]),
                 ("overhead: served - direct (paired)", out["overhead_ms"])]
    print(f"\nedit {args.edit_size}x{args.edit_size}, {args.edit_steps} steps, tiny pipeline, "
          f"{args.edit_runs} runs each, load {os.getloadavg()[0]:.2f}")
    print(f"{'':44} {'p50 ms':>9} {'min ms':>9} {'max ms':>9}")
    for name, s in rows:
        print(f"{name:44} {s['p50']:9.1f} {s['min']:9.1f} {s['max']:9.1f}")
    out_path = args.out if args.out != RESULTS else RESULTS.with_name("edit_served.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "url": args.served, "size": args.edit_size, "steps": args.edit_steps,
        "runs": args.edit_runs, "load": os.getloadavg(), "summary": out,
        "served": served, "direct": direct}, indent=2))
    print(f"wrote {out_path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="output and condition image, px")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models", nargs="+", default=["tiny", "full-width-1-block"])
    parser.add_argument("--case", help=argparse.SUPPRESS)  # MODEL:QUANTIZATION, in a child
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--served", metavar="URL",
                        help="time whole edits on a running server (--models tiny) vs direct")
    parser.add_argument("--edit-runs", type=int, default=5, help="edits each (--served)")
    parser.add_argument("--edit-steps", type=int, default=4, help="steps per edit (--served)")
    parser.add_argument("--edit-size", type=int, default=256, help="output side px (--served)")
    parser.add_argument("--no-direct", action="store_true", help="served edits only (--served)")
    args = parser.parse_args()
    if args.served:
        return served_vs_direct(args)

    if args.case:
        print(json.dumps(run_case(*args.case.split(":"), args)))
        return 0

    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}"
              for k in ("size", "text_tokens", "runs", "warmup", "threads")]
    results = []
    for model_name in args.models:
        for quantization in ("none", "torchao_int8wo"):
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.edit", f"--case={model_name}:{quantization}",
                 *passed], cwd=REPO, capture_output=True, text=True, check=True)
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{model_name:>19} {quantization:>15}: {r['step_ms']['p50']:9.1f} ms/step",
                  flush=True)

    print(f"\n{args.size}x{args.size} px output + condition, {args.text_tokens} text tokens, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':>19} {'quant':>15} {'params M':>9} {'weights MiB':>12} {'tokens':>7} "
          f"{'step p50 ms':>12} {'RSS MiB: build peak':>20} {'loaded':>7} {'step peak':>10}")
    for r in results:
        print(f"{r['model']:>19} {r['quantization']:>15} {r['params_m']:9.2f} "
              f"{r['weights_mib']:12.1f} {r['tokens']:7d} {r['step_ms']['p50']:12.1f} "
              f"{r['rss_mib']['build_peak']:20.0f} {r['rss_mib']['loaded']:7.0f} "
              f"{r['rss_mib']['step_peak']:10.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "size": args.size, "text_tokens": args.text_tokens, "threads": args.threads,
        "runs": args.runs, "warmup": args.warmup,
        "memory": "RSS from /proc/self/status, one process per case",
        "load": os.getloadavg(), "results": results,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
