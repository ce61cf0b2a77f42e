"""SamDecoder: SAM's prompt encoder + mask decoder as an ONNX graph run by ONNX Runtime.

The replica imports no torch unless the ONNX file must first be exported. Each click fetches the
session's embedding from the object store by reference (zero-copy on the same node); a small LRU
keeps recently used ones so repeated clicks on one image skip even that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import ray
from pydantic import BaseModel, Field
from ray import serve

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig
from atelier3d.errors import EmbeddingLostError
from atelier3d.metrics import count_embedding_lookup, observe_stage
from atelier3d.models.segment.sam import sam_checkpoint, sam_info
from atelier3d.optimizations.segment_onnx import cached_decoder_onnx
from atelier3d.pull_status import wait_for_weights
from atelier3d.stages.segment import (
    DecodeRequest,
    DecodeResult,
    DecoderPrompt,
    decoder_prompt,
    mask_candidates,
)

logger = logging.getLogger("ray.serve")


class DecoderUserConfig(BaseModel):
    # One thread per replica: ORT and torch pools collapse when cores are oversubscribed.
    intra_op_threads: int = Field(1, ge=1)
    embedding_cache_size: int = Field(8, ge=0)


@serve.deployment(name="SamDecoder")
class SamDecoder:
    def __init__(self, config: dict) -> None:
        cfg = AppConfig.model_validate(config)
        wait_for_weights(cfg.cache_path, ["sam"])  # a pull beside the server
        self.checkpoint = sam_checkpoint(cfg)
        self.onnx_paths = {
            multimask: cached_decoder_onnx(
                self.checkpoint, cfg.cache_path, multimask=multimask, int8=cfg.sam.decoder_int8
            )
            for multimask in (True, False)
        }
        self.providers = cfg.sam.onnx_providers
        self.sessions: dict = {}
        # Serve runs sync methods on a thread pool, so up to max_ongoing_requests decodes could
        # run at once; a replica is sized as intra_op_threads cores, and overlapping runs would
        # only oversubscribe them (and starve the encoder). Requests queue here instead of in
        # the router, whose backoff collapses throughput when every replica looks full.
        self.run_lock = threading.Lock()
        self.embeddings: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = DecoderUserConfig().embedding_cache_size  # until reconfigure

    def reconfigure(self, user_config: dict) -> None:
        import onnxruntime as ort

        settings = DecoderUserConfig.model_validate(user_config or {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        available = set(ort.get_available_providers())
        providers = [p for p in self.providers if p in available] or ["CPUExecutionProvider"]
        self.sessions = {
            multimask: ort.InferenceSession(str(path), options, providers=providers)
            for multimask, path in self.onnx_paths.items()
        }
        self.cache_size = settings.embedding_cache_size
        logger.info("SamDecoder ready: providers %s, %d thread(s)", providers,
                    settings.intra_op_threads)

    def info(self) -> ModelInfo:
        return sam_info(self.checkpoint)

    def graph(self, multimask: bool) -> bytes:
        """The ONNX file this replica runs, for clients that decode it themselves."""
        return self.onnx_paths[multimask].read_bytes()

    def _embedding(self, ref: ray.ObjectRef) -> np.ndarray:
        key = ref.hex()
        count_embedding_lookup(hit=key in self.embeddings)
        if key in self.embeddings:
            self.embeddings.move_to_end(key)
            return self.embeddings[key]
        try:
            embedding = ray.get(ref, timeout=60)
        except ray.exceptions.ObjectLostError as exc:
            raise EmbeddingLostError(f"embedding {key} is gone: {type(exc).__name__}") from exc
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError,
                ray.exceptions.WorkerCrashedError) as exc:
            # The encode failed, or its replica died before finishing: the Gateway re-encodes.
            raise EmbeddingLostError(
                f"embedding {key} failed to compute: {type(exc).__name__}") from exc
        if self.cache_size:
            self.embeddings[key] = embedding
            while len(self.embeddings) > self.cache_size:
                self.embeddings.popitem(last=False)
        return embedding

    def _run(self, multimask: bool, embedding: np.ndarray, prompt: DecoderPrompt):
        return self.sessions[multimask].run(None, prompt.feeds(embedding))

    def decode(self, request: DecodeRequest) -> DecodeResult:
        embedding = self._embedding(request.embedding[0])
        prompt = decoder_prompt(
            request.size, request.points, request.labels, request.box, request.mask_logits
        )
        with self.run_lock:
            start = time.perf_counter()
            masks, scores, low_res = self._run(request.multimask, embedding, prompt)
            decode_ms = (time.perf_counter() - start) * 1000
        observe_stage("decode", decode_ms)
        return DecodeResult(
            candidates=mask_candidates(masks[0], scores[0]),
            low_res=low_res[0] if request.return_low_res else None,
            decode_ms=decode_ms,
        )
