"""``edit.cache``: time per edit and change of the output against the uncached edit (same seed),
for each of diffusers' step caches, on the tiny Qwen-Image-Edit pipeline (random weights).

Each round runs the uncached edit and then every cache on the same request, so all of them see
the same machine load; ``--rounds`` rounds, p50 reported. The change of the output is measured
against the uncached pixels: mean absolute difference (0-255) and PSNR. Block runs count the
last transformer block's attention calls (a skipped or predicted step does not call it).

On random weights the change says nothing of an edit's quality: it shows the hooks work and what
they skip. Writes ``benchmarks/results/edit_cache.json``. Run: ``.venv/bin/python -m
benchmarks.edit_cache``. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, RESULTS_DIR, load_average, machine_info

CACHES: dict[str, dict | None] = {
    "none": None,
    "first_block_0.05": {"kind": "first_block", "threshold": 0.05},
    "first_block_0.2": {"kind": "first_block", "threshold": 0.2},
    "taylorseer_3": {"kind": "taylorseer", "cache_interval": 3, "disable_cache_before_step": 2},
    # Flat ratios: no calibration exists for random weights; a trained model needs its own.
    "mag_flat": {"kind": "mag", "mag_ratios": [1.0, 1.0], "threshold": 0.06,
                 "retention_ratio": 0.2, "max_skip_steps": 3},
}


class Silent:
    def report(self, stage: str, step: int, total: int) -> None:
        pass


def run_once(pipes: Any, request: Any, cache: dict | None) -> tuple[np.ndarray, float, int]:
    from atelier3d.config import EditSettings
    from atelier3d.imaging import decode_image
    from atelier3d.models.edit.qwen_image_edit import run_edit

    settings = EditSettings.model_validate(pipes.settings.model_dump() | {"cache": cache})
    calls = 0

    def count(module: Any, args: Any) -> None:
        nonlocal calls
        calls += 1

    hook = pipes.edit.transformer.transformer_blocks[-1].attn.to_q.register_forward_pre_hook(count)
    start = time.perf_counter()
    try:
        result = run_edit(dataclasses.replace(pipes, settings=settings), request, Silent())
    finally:
        hook.remove()
    ms = (time.perf_counter() - start) * 1000
    return decode_image(result["data"], 1 << 24), ms, calls


def change(image: np.ndarray, reference: np.ndarray) -> dict:
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    return {"mean_abs": round(float(np.mean(np.abs(diff))), 3),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255 ** 2 / mse), 2)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "edit_cache.json")
    args = parser.parse_args(argv)

    import torch

    from atelier3d.config import EditSettings
    from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline
    from atelier3d.stages.edit import EditRequest

    torch.set_num_threads(1)
    settings = EditSettings(min_side=32, quantization="none", text_encoder_quantization="none")
    pipes = load_edit_pipeline(settings, "tiny", REPO / ".cache" / "bench")
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    request = EditRequest.build(settings, images=[image], prompt="make the shirt red",
                                steps=args.steps, seed=7, width=args.size, height=args.size)
    load_start = load_average()
    times: dict[str, list[float]] = {name: [] for name in CACHES}
    outputs: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, cache in CACHES.items():
            out, ms, n = run_once(pipes, request, cache)
            times[name].append(ms)
            outputs[name], calls[name] = out, n
    reference, plain_ms = outputs["none"], float(np.median(times["none"]))
    rows = {}
    for name, cache in CACHES.items():
        p50 = float(np.median(times[name]))
        rows[name] = {"cache": cache, "p50_ms": round(p50, 1), "times_ms": times[name],
                      "speedup": round(plain_ms / p50, 3), "block_runs": calls[name],
                      "change_vs_none": change(outputs[name], reference)}
    result = {
        "machine": machine_info(), "weights": "tiny random (the test profile's pipeline)",
        "steps": args.steps, "size": args.size, "true_cfg": True, "rounds": args.rounds,
        "torch_threads": 1, "load_average": {"start": load_start, "end": load_average()},
        "caches": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'cache':18} {'p50 ms':>8} {'speedup':>8} {'blocks':>7} {'|diff|':>7} {'PSNR':>7}")
    for name, row in rows.items():
        c = row["change_vs_none"]
        print(f"{name:18} {row['p50_ms']:8.1f} {row['speedup']:8.2f} {row['block_runs']:7d} "
              f"{c['mean_abs']:7.2f} {c['psnr_db'] if c['psnr_db'] is not None else 'same':>7}")
    print(f"wrote {args.out.resolve()}")
    return args.out


if __name__ == "__main__":
    main()
