"""The baseline the served system is measured against: a SAM2-demo-style single-process server.

Built the way SAM2's demo backend is: ONE process, a thread pool serving requests (FastAPI's sync
routes run on uvicorn's worker threads), and ONE global lock around every model call, so an
image encode blocks every click until it finishes. The models are exactly the served ones: the
same torch vit_b checkpoint run through ``SamPredictor.set_image`` (SAM's own preprocessing) and
the same cached ONNX decoder with the same one-thread session options. It speaks the subset of
the ``/v1`` API the benchmark uses, with the same request and response models:

- ``POST /v1/sessions`` (multipart field ``image``; encodes synchronously, ``wait`` is accepted)
- ``POST /v1/sessions/{id}/segment`` (JSON ``SegmentRequest`` -> ``SegmentResponse``)
- ``GET /healthz``

Run: ``.venv/bin/python -m benchmarks.baseline_server --checkpoint PATH --cache-dir DIR``.
Loopback only: it always binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile

from atelier3d import rle
from atelier3d.api.common import RLE
from atelier3d.api.segment import (
    MaskCandidate,
    SegmentRequest,
    SegmentResponse,
    SessionInfo,
    Timings,
)
from atelier3d.errors import ApiError
from atelier3d.imaging import decode_image
from atelier3d.models.segment.sam import SamCheckpoint, resolve_checkpoint
from atelier3d.optimizations.segment_onnx import cached_decoder_onnx
from atelier3d.stages.segment import decoder_prompt

logger = logging.getLogger("baseline")

MAX_PIXELS = 36_000_000  # the served default (local.yaml limits.max_pixels)
MAX_SESSIONS = 64  # bounded like the served store; oldest dropped first


@dataclass
class BaselineSession:
    size: tuple[int, int]
    embedding: np.ndarray  # (1, 256, 64, 64) float32


class LockedSam:
    """The torch encoder and the ONNX decoders behind one global lock (the SAM2 demo's design)."""

    def __init__(self, checkpoint: SamCheckpoint, cache_dir: Path, threads: int) -> None:
        import onnxruntime as ort
        import torch
        from segment_anything import SamPredictor

        # Same thread counts as the served deployments (encoder torch_threads, decoder ORT).
        torch.set_num_threads(threads)
        self.predictor = SamPredictor(checkpoint.build())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.decoders = {
            multimask: ort.InferenceSession(
                str(cached_decoder_onnx(checkpoint, cache_dir, multimask=multimask)),
                options,
                providers=["CPUExecutionProvider"],
            )
            for multimask in (True, False)
        }
        self.lock = threading.Lock()

    def encode(self, image: np.ndarray) -> np.ndarray:
        import torch

        with self.lock, torch.inference_mode():
            self.predictor.set_image(image)  # ResizeLongestSide + normalise + pad + ViT
            return self.predictor.features.float().cpu().numpy().copy()

    def decode(self, embedding: np.ndarray, size: tuple[int, int], request: SegmentRequest):
        prompt = decoder_prompt(
            size,
            np.array(request.points, np.float64) if request.points else None,
            np.array(request.labels, np.float64) if request.labels else None,
            np.array(request.box, np.float64) if request.box is not None else None,
            None,
        )
        feeds = prompt.feeds(embedding)
        # Only the model call is under the lock (the SAM2 demo also holds it while it RLE-encodes);
        # this is the kinder choice for the baseline.
        with self.lock:
            start = time.perf_counter()
            masks, scores, _ = self.decoders[request.multimask].run(None, feeds)
            decode_ms = (time.perf_counter() - start) * 1000
        return masks[0], scores[0], decode_ms


def segment_response(masks: np.ndarray, scores: np.ndarray, decode_ms: float,
                     total_ms: float) -> SegmentResponse:
    """The served API's response model, filled the way SegmentService.segment fills it."""
    rles = rle.encode(masks)
    candidates = [
        MaskCandidate(rle=RLE(**r), score=float(s), bbox=tuple(rle.bbox_xywh(r)), area=rle.area(r))
        for r, s in zip(rles, scores, strict=True)
    ]
    return SegmentResponse(
        masks=candidates,
        selected=int(np.argmax(scores)),
        timings_ms=Timings(wait_embedding_ms=0.0, decode_ms=decode_ms, total_ms=total_ms),
    )


def build_app(models: LockedSam) -> FastAPI:
    app = FastAPI(title="atelier3d benchmark baseline (one process, one lock)")
    sessions: OrderedDict[str, BaselineSession] = OrderedDict()
    sessions_lock = threading.Lock()  # the dict only; never held during a model call

    # Plain ``def`` routes: FastAPI runs them on its worker-thread pool, like a threaded Flask app.
    @app.post("/v1/sessions", status_code=201, response_model=SessionInfo)
    def create_session(image: Annotated[UploadFile, File()], wait: bool = True) -> SessionInfo:
        try:
            array = decode_image(image.file.read(), MAX_PIXELS)
        except ApiError as exc:
            raise HTTPException(exc.status, exc.message) from exc
        embedding = models.encode(array)  # synchronous, as in the demo: the upload waits
        session_id = secrets.token_urlsafe(16)
        with sessions_lock:
            sessions[session_id] = BaselineSession(size=array.shape[:2], embedding=embedding)
            while len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)
        return SessionInfo(session_id=session_id, width=array.shape[1], height=array.shape[0],
                           embedding="ready", expires_in_s=3600.0)

    @app.post("/v1/sessions/{session_id}/segment", response_model=SegmentResponse)
    def segment(session_id: str, body: SegmentRequest) -> SegmentResponse:
        start = time.perf_counter()
        with sessions_lock:
            session = sessions.get(session_id)
        if session is None:
            raise HTTPException(404, f"session {session_id} not found")
        masks, scores, decode_ms = models.decode(session.embedding, session.size, body)
        total_ms = (time.perf_counter() - start) * 1000
        return segment_response(masks, scores, decode_ms, total_ms)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="SAM .pth (e.g. the random vit_b)")
    parser.add_argument("--cache-dir", required=True, type=Path, help="ONNX cache directory")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ORT intra-op threads (the served local.yaml uses 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="baseline: %(message)s")
    checkpoint = resolve_checkpoint(args.checkpoint, "real", cache_dir=args.cache_dir)
    models = LockedSam(checkpoint, args.cache_dir, args.threads)
    logger.info("models loaded (%s); serving on 127.0.0.1:%d", checkpoint.model_type, args.port)
    uvicorn.run(build_app(models), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
