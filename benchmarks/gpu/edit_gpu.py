"""Qwen-Image-Edit with bitsandbytes on a lent GPU: one prepared run (no internet, ~5 minutes).

1. The product path on the tiny pipeline (written here): ``load_edit_pipeline`` with the
   transformer and the text encoder in nf4 (then 8-bit), two ``run_edit`` calls each: load and
   edit times, the quantized layer classes, the output size.
2. The full-size transformer (60 blocks, 24 heads x 128, joint_attention_dim 3584; random
   weights built directly on the GPU in bf16) at 1024x1024: time per step (one forward: 4096
   output + 4096 condition patches + ``--text-tokens``) and peak GPU memory
   (``torch.cuda.max_memory_allocated``) in bf16, then the same weights converted to nf4 in place
   (``bnb.nn.Linear4bit``, compute dtype bf16, the skip list ``load_edit_pipeline`` uses) and
   measured again, with the nf4 output's relative error against bf16's.

``--dry-run`` runs the same code on CPU with the tiny transformer and no quantization, to check
the script here. Prints a summary, writes ``edit_gpu.json`` to ``$OUT`` (or
benchmarks/results/).

The GPU image has torch, transformers, tokenizers, huggingface_hub and safetensors but no
diffusers, bitsandbytes or pydantic: carry them as wheels (~52 MB). Here, once::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        bitsandbytes==0.50.2 diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types typing-inspection typing-extensions

then one device run with ``carry=[".whl"]`` and ``timeout_s`` about 420::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu/edit_gpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # atelier3d and benchmarks.edit from this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.edit import (  # noqa: E402
    FULL_CONFIG,
    build_transformer,
    model_configs,
    time_steps,
    transformer_inputs,
    weight_bytes,
)


class Reporter:
    """``run_edit``'s reporter, counting denoise events."""

    def __init__(self) -> None:
        self.denoise = 0

    def report(self, stage: str, step: int, total: int) -> None:
        self.denoise += stage == "denoise"


def tiny_pipeline_edits(quantizations: list[str], device: str, cache: Path) -> list[dict]:
    from atelier3d.config import EditSettings
    from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline, run_edit
    from atelier3d.stages.edit import EditRequest

    image = np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    out = []
    for quantization in quantizations:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        settings = EditSettings(quantization=quantization, text_encoder_quantization=quantization,
                                device=device, min_side=32)
        start = time.perf_counter()
        pipes = load_edit_pipeline(settings, "tiny", cache)
        load_s = time.perf_counter() - start
        request = EditRequest.build(settings, images=[image], prompt="make it red", steps=4,
                                    width=64, height=64)
        edits = []
        for _ in range(2):  # the first one includes kernel warm-up
            reporter = Reporter()
            start = time.perf_counter()
            result = run_edit(pipes, request, reporter)
            edits.append({"s": time.perf_counter() - start, "denoise_events": reporter.denoise,
                          "meta": result["meta"]})
        transformer_linear = pipes.edit.transformer.transformer_blocks[0].attn.to_q
        text_linear = pipes.edit.text_encoder.model.language_model.layers[0].self_attn.q_proj
        out.append({
            "quantization": pipes.quantization, "load_s": load_s, "edits": edits,
            "transformer_linear": type(transformer_linear).__name__,
            "text_encoder_linear": type(text_linear).__name__,
            "cuda_peak_mib": (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                              else None),
        })
        seconds = ", ".join(f"{e['s']:.2f}" for e in edits)
        print(f"tiny {quantization}: load {load_s:.1f} s, edits {seconds} s, linears "
              f"{out[-1]['transformer_linear']}/{out[-1]['text_encoder_linear']}", flush=True)
        del pipes
    return out


def to_nf4(model: Any, config: Any) -> int:
    """Swaps every ``nn.Linear`` outside ``config``'s skip list for a ``Linear4bit`` holding its
    weights, quantized as ``config`` (diffusers' BitsAndBytesConfig) says; the bf16 weights are
    freed one layer at a time. Returns the number swapped."""
    import bitsandbytes as bnb

    skip = config.llm_int8_skip_modules or []

    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, torch.nn.Linear) or any(s in full for s in skip):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                  bias=child.bias is not None,
                                  compute_dtype=config.bnb_4bit_compute_dtype,
                                  compress_statistics=config.bnb_4bit_use_double_quant,
                                  quant_type=config.bnb_4bit_quant_type, device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                       compress_statistics=config.bnb_4bit_use_double_quant,
                                       quant_type=config.bnb_4bit_quant_type)
            q.weight = weight.to(child.weight.device)  # quantizes on the GPU
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q)
            swapped += 1
    return swapped


def full_transformer(args: argparse.Namespace, device: str) -> dict:
    from atelier3d.models.edit.qwen_image_edit import component_quantization

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = FULL_CONFIG if device == "cuda" else model_configs()["tiny"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def peak_reset() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None

    start = time.perf_counter()
    model = build_transformer(config, dtype, device)
    sync()
    build_s = time.perf_counter() - start
    inputs = transformer_inputs(config, args.size, args.text_tokens, dtype, device)
    out: dict[str, Any] = {"config": config, "size": args.size, "text_tokens": args.text_tokens,
                           "build_s": build_s,
                           "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    peak_reset()
    times, reference = time_steps(model, inputs, args.runs, args.warmup, sync)
    out["bf16" if device == "cuda" else "float32"] = {
        "step_ms": times, "step_ms_p50": float(np.median(times)),
        "weights_mib": weight_bytes(model) / 2**20, "peak_mib": peak_mib()}
    print(f"full transformer {dtype}: {np.median(times):.0f} ms/step, peak {peak_mib()} MiB",
          flush=True)
    if device != "cuda":
        return out

    bnb_config = component_quantization("transformer", "bitsandbytes_4bit", dtype)
    start = time.perf_counter()
    swapped = to_nf4(model, bnb_config)
    torch.cuda.empty_cache()
    convert_s = time.perf_counter() - start
    peak_reset()
    times, nf4_out = time_steps(model, inputs, args.runs, args.warmup, sync)
    error = ((nf4_out.float() - reference.float()).norm() / reference.float().norm()).item()
    out["nf4"] = {"step_ms": times, "step_ms_p50": float(np.median(times)),
                  "weights_mib": weight_bytes(model) / 2**20, "peak_mib": peak_mib(),
                  "linears_swapped": swapped, "convert_s": convert_s,
                  "relative_error_vs_bf16": error}
    print(f"full transformer nf4: {np.median(times):.0f} ms/step, peak {peak_mib():.0f} MiB, "
          f"rel. error {error:.3f}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny, no bitsandbytes")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=1400,
                        help="prompt hidden states: the Edit pipeline's include the input "
                        "image's ~1.3 k vision tokens at ~1 MP")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    if args.dry_run:
        device, quantizations = "cpu", ["none"]
        args.size, args.text_tokens, args.runs = min(args.size, 128), min(args.text_tokens, 32), 1
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    else:
        device, quantizations = "cuda", ["bitsandbytes_4bit", "bitsandbytes_8bit"]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__, "dry_run": args.dry_run,
    }
    with tempfile.TemporaryDirectory() as cache:
        report["tiny_pipeline"] = tiny_pipeline_edits(quantizations, device, Path(cache))
    if device == "cuda":
        torch.cuda.empty_cache()
    report["full_transformer"] = full_transformer(args, device)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "edit_gpu.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_dir / 'edit_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
