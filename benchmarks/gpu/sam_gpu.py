"""SAM on a GPU: the encoder per image (vit_b / vit_l / vit_h, fp32 / bf16 / fp16, batch 1 and 4)
and the decoder per click (the served ONNX graph on ONNX Runtime's CPU provider, 1 and 4 threads,
fp32 and int8, against segment-anything's torch decoder on the GPU).

Random weights built by segment-anything's own registry (the compute is a trained model's); the
encoder input is what ``SamEncoder`` feeds it (``ResizeLongestSide`` + ``Sam.preprocess``); the
decoder inputs come from ``decoder_prompt``, as in ``SamDecoder``. Timing: CUDA events around each
call after warm-up, median of ``--runs``; peak memory is ``torch.cuda.max_memory_allocated``.

Run: ``python benchmarks/gpu/sam_gpu.py`` (JSON to ``$OUT/sam_gpu.json`` when ``$OUT`` is set);
``--dry-run``: vit_b only, CPU, one run each, to check the script here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from atelier3d.optimizations.segment_onnx import export_decoder, quantize_int8  # noqa: E402
from atelier3d.stages.segment import decoder_prompt, preprocess_shape  # noqa: E402


def timed(fn, runs: int, warmup: int, device: str) -> list[float]:
    """Milliseconds per call: CUDA events on the GPU, the wall clock on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.median(times)), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "runs": len(times)}


def encoder_runs(sam: Any, image: np.ndarray, device: str, args: argparse.Namespace) -> dict:
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    one = sam.preprocess(torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float())
    out: dict[str, Any] = {}
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    for name, dtype in dtypes.items():
        if device != "cuda" and name != "float32":
            continue
        for batch in args.batches:
            inputs = one.expand(batch, -1, -1, -1).contiguous()

            def encode(inputs: Any = inputs, dtype: Any = dtype) -> None:
                with torch.inference_mode(), torch.autocast(device, dtype=dtype,
                                                            enabled=dtype is not None):
                    sam.image_encoder(inputs)

            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = timed(encode, args.runs, args.warmup, device)
            row = summary(times)
            row["per_image_ms"] = round(row["p50_ms"] / batch, 2)
            row["images_per_s"] = round(1000 * batch / row["p50_ms"], 1)
            if device == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out[f"{name}/b{batch}"] = row
            print(f"  encoder {name:8s} batch {batch}: {row['p50_ms']:8.1f} ms "
                  f"({row['per_image_ms']:.1f} ms/image, {row['images_per_s']} images/s)"
                  + (f", peak {row['peak_gib']} GiB" if device == "cuda" else ""), flush=True)
    return out


def decoder_runs(sam: Any, embedding: np.ndarray, size: tuple[int, int], device: str,
                 args: argparse.Namespace, workdir: Path) -> dict:
    """The served decoder (ONNX on CPU) against segment-anything's torch decoder on ``device``."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    height, width = size
    prompts = {n: decoder_prompt(size, rng.uniform([0, 0], [width, height], (n, 2)),
                                 np.ones(n, np.int64), None, None) for n in (1, 5)}
    out: dict[str, Any] = {}
    fp32 = export_decoder(sam.cpu(), workdir / "decoder.onnx", multimask=True)
    sam.to(device)
    int8 = quantize_int8(fp32, workdir / "decoder.int8.onnx")
    for label, path in (("fp32", fp32), ("int8", int8)):
        for threads in args.ort_threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for n, prompt in prompts.items():
                feeds = prompt.feeds(embedding)
                row = summary(timed(lambda s=session, f=feeds: s.run(None, f), args.runs * 3,
                                    args.warmup + 2, "cpu"))
                out[f"onnx_cpu_{label}/threads{threads}/points{n}"] = row
                print(f"  decoder ONNX CPU {label} {threads:2d} thread(s), {n} point(s): "
                      f"{row['p50_ms']:6.2f} ms", flush=True)

    features = torch.as_tensor(embedding, device=device)
    input_size = preprocess_shape(height, width)
    for n, prompt in prompts.items():
        coords = torch.as_tensor(prompt.point_coords, device=device)
        labels = torch.as_tensor(prompt.point_labels, device=device)

        def decode(coords: Any = coords, labels: Any = labels) -> None:
            with torch.inference_mode():
                sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None,
                                                   masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                    multimask_output=True)
                sam.postprocess_masks(low_res, input_size, size)

        row = summary(timed(decode, args.runs * 3, args.warmup + 2, device))
        out[f"torch_{device}/points{n}"] = row
        print(f"  decoder torch {device} float32, {n} point(s): {row['p50_ms']:6.2f} ms",
              flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="vit_b on CPU, one run each")
    parser.add_argument("--archs", nargs="+", default=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--ort-threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import torch
    from segment_anything import sam_model_registry
    from skimage import data

    if args.dry_run:
        device, args.archs, args.batches, args.runs, args.warmup = "cpu", ["vit_b"], [1], 1, 0
        args.ort_threads = [1]
    elif not torch.cuda.is_available():
        print("no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    image = data.coffee()  # 400x600 RGB, resized to 1024x683 like any upload
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "torch": torch.__version__, "image": list(image.shape),
                              "cpu_count": os.cpu_count(), "archs": {}}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    for arch in args.archs:
        print(f"{arch}:", flush=True)
        torch.manual_seed(0)
        t = time.perf_counter()
        sam = sam_model_registry[arch](checkpoint=None).to(device).eval()
        entry: dict[str, Any] = {
            "build_s": round(time.perf_counter() - t, 1),
            "encoder_params_m": round(sum(p.numel() for p in sam.image_encoder.parameters())
                                      / 1e6, 1)}
        entry["encoder"] = encoder_runs(sam, image, device, args)
        if arch == args.archs[-1]:  # the decoder is the same graph for every arch
            from segment_anything.utils.transforms import ResizeLongestSide

            resized = ResizeLongestSide(1024).apply_image(image)
            with torch.inference_mode():
                batch = sam.preprocess(torch.as_tensor(resized, device=device)
                                       .permute(2, 0, 1)[None].float())
                embedding = sam.image_encoder(batch).float().cpu().numpy()
            with tempfile.TemporaryDirectory() as workdir:
                entry["decoder"] = decoder_runs(sam, embedding, image.shape[:2], device, args,
                                                Path(workdir))
        report["archs"][arch] = entry
        del sam
        if device == "cuda":
            torch.cuda.empty_cache()
        if out_dir is not None:  # after each arch: a cut-short run keeps what it had
            (out_dir / "sam_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
