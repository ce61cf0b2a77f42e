"""Qwen-Image-Edit's transformer on CPU: time per denoising step and peak memory, none vs
torchao_int8wo.

Two transformers, random weights (``QwenImageTransformer2DModel`` built from its config):

- ``tiny``: the tiny profile's (``atelier3d.models.qwen_edit.TINY_TRANSFORMER``), what the tests
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

Prints a table, writes ``benchmarks/results/edit.json``. Run: ``.venv/bin/python
benchmarks/edit.py`` (about 2 minutes on 2 cores). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "edit.json"
# Qwen/Qwen-Image-Edit's transformer/config.json (20.4 B parameters).
FULL_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                   axes_dims_rope=(16, 56, 56))


def model_configs() -> dict[str, dict]:
    from atelier3d.models.qwen_edit import TINY_TRANSFORMER

    return {"tiny": TINY_TRANSFORMER, "full-width-1-block": FULL_CONFIG | {"num_layers": 1}}


@contextlib.contextmanager
def default_dtype(dtype: Any):
    """Builds parameters directly in ``dtype`` (the full model in float32 needs 82 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(*args.case.split(":"), args)))
        return 0

    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}"
              for k in ("size", "text_tokens", "runs", "warmup", "threads")]
    results = []
    for model_name in args.models:
        for quantization in ("none", "torchao_int8wo"):
            child = subprocess.run(
                [sys.executable, __file__, f"--case={model_name}:{quantization}", *passed],
                capture_output=True, text=True, check=True)
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
