"""The ONNX decoder export: cache keying, reuse, the int8 variant, the aspect-ratio fix."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from atelier3d.optimizations.segment_onnx import cached_decoder_onnx, export_options_key
from atelier3d.stages.segment import decoder_prompt


def run(path, embedding, size, points):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = decoder_prompt(size, np.array(points), np.ones(len(points)), None, None)
    return session.run(None, p.feeds(embedding))


def test_cache_is_keyed_by_checkpoint_and_options(tiny_sam, tiny_dir):
    first = cached_decoder_onnx(tiny_sam, tiny_dir, multimask=True)
    mtime = first.stat().st_mtime_ns
    assert cached_decoder_onnx(tiny_sam, tiny_dir, multimask=True) == first
    assert first.stat().st_mtime_ns == mtime  # reused, not re-exported
    assert cached_decoder_onnx(tiny_sam, tiny_dir, multimask=False) != first
    keys = {export_options_key(tiny_sam, m, q) for m in (True, False) for q in (True, False)}
    assert len(keys) == 4


def test_full_resolution_follows_any_aspect_ratio(tiny_sam, tiny_dir):
    """segment-anything 1.0 froze the export dummy's size into the graph; the fix must not."""
    path = cached_decoder_onnx(tiny_sam, tiny_dir, multimask=True)
    embedding = np.random.RandomState(0).randn(1, 256, 64, 64).astype(np.float32)
    for size in [(1500, 2250), (2250, 1500), (31, 1000), (1000, 31), (1, 1)]:
        masks, scores, low = run(path, embedding, size, [[0.5, 0.5]])
        assert masks.shape == (1, 3, *size) and masks.dtype == bool
        assert scores.shape == (1, 3) and low.shape == (1, 3, 256, 256)


def test_int8_decoder_is_smaller_and_close(tiny_sam, tiny_dir):
    fp32 = cached_decoder_onnx(tiny_sam, tiny_dir, multimask=True)
    int8 = cached_decoder_onnx(tiny_sam, tiny_dir, multimask=True, int8=True)
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    embedding = np.random.RandomState(1).randn(1, 256, 64, 64).astype(np.float32)
    _, s32, low32 = run(fp32, embedding, (480, 640), [[320, 240]])
    _, s8, low8 = run(int8, embedding, (480, 640), [[320, 240]])
    corr = np.corrcoef(low32.ravel(), low8.ravel())[0, 1]
    assert corr > 0.9, corr
