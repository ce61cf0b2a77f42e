"""SamDecoder: SAM's prompt encoder + mask decoder as an ONNX graph run by ONNX Runtime.

The replica imports no torch unless the ONNX file must first be exported. Each click fetches the
session's embedding from the object store by reference (zero-copy on the same node); a small LRU
keeps recently used ones so repeated clicks on one image skip even that. The LRU is Serve's model
multiplexing keyed by the embedding's reference: the Gateway sends each click with
``multiplexed_model_id`` set to it, so Serve's router sends a session's clicks to the replica
that already holds its embedding, and with several replicas each embedding is fetched by one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque

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
    # Embeddings a replica keeps (Serve's multiplexed loader: taken at the first reconfigure).
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
        # Each decode runs its ONNX call in a worker thread, so up to max_ongoing_requests could
        # run at once; a replica is sized as intra_op_threads cores, and overlapping runs would
        # only oversubscribe them (and starve the encoder). Requests queue here instead of in
        # the router, whose backoff collapses throughput when every replica looks full.
        self.run_lock = threading.Lock()
        # The references the multiplexed loader fetches, by their hex (its model id).
        self.refs: OrderedDict[str, ray.ObjectRef] = OrderedDict()
        self.fetched: deque[str] = deque(maxlen=4096)  # keys fetched, latest last (tests read)
        self.fresh: set[str] = set()  # fetched for a click that has not counted its miss yet
        self.load_embedding = None  # Serve's multiplexed loader, made in reconfigure

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
        if self.load_embedding is None:
            # Made once: Serve's loader takes its size when made (later changes need a restart).
            # Without a cache every click fetches its embedding, and routes anywhere.
            async def load(key: str) -> np.ndarray:  # a function: Serve keeps its cache on it
                return await self._fetch_key(key)

            self.load_embedding = (serve.multiplexed(
                max_num_models_per_replica=settings.embedding_cache_size)(load)
                if settings.embedding_cache_size else False)
        logger.info("SamDecoder ready: providers %s, %d thread(s)", providers,
                    settings.intra_op_threads)

    def info(self) -> ModelInfo:
        return sam_info(self.checkpoint)

    def graph(self, multimask: bool) -> bytes:
        """The ONNX file this replica runs, for clients that decode it themselves."""
        return self.onnx_paths[multimask].read_bytes()

    def fetched_embeddings(self) -> tuple[str, list[str]]:
        """This replica's id and the embeddings it fetched, in order (for tests, benchmarks)."""
        return serve.get_replica_context().replica_id.unique_id, list(self.fetched)

    async def _embedding(self, ref: ray.ObjectRef) -> np.ndarray:
        key = ref.hex()
        if not self.load_embedding:
            count_embedding_lookup(hit=False)
            return await asyncio.to_thread(self._fetch, ref)
        self.refs[key] = ref
        self.refs.move_to_end(key)
        while len(self.refs) > 64:  # only loads in flight (or failed) keep theirs
            self.refs.popitem(last=False)
        embedding = await self.load_embedding(key)
        count_embedding_lookup(hit=key not in self.fresh)
        self.fresh.discard(key)
        return embedding

    async def _fetch_key(self, key: str) -> np.ndarray:
        embedding = await asyncio.to_thread(self._fetch, self.refs[key])
        # Fetched: the reference goes, so the Gateway's eviction still frees the object.
        self.refs.pop(key, None)
        self.fresh.add(key)
        return embedding

    def _fetch(self, ref: ray.ObjectRef) -> np.ndarray:
        key = ref.hex()
        self.fetched.append(key)
        try:
            embedding = ray.get(ref, timeout=60)
        except ray.exceptions.ObjectLostError as exc:
            raise EmbeddingLostError(f"embedding {key} is gone: {type(exc).__name__}") from exc
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError,
                ray.exceptions.WorkerCrashedError) as exc:
            # The encode failed, or its replica died before finishing: the Gateway re-encodes.
            raise EmbeddingLostError(
                f"embedding {key} failed to compute: {type(exc).__name__}") from exc
        return embedding

    def _run(self, multimask: bool, embedding: np.ndarray, prompt: DecoderPrompt):
        return self.sessions[multimask].run(None, prompt.feeds(embedding))

    async def decode(self, request: DecodeRequest) -> DecodeResult:
        embedding = await self._embedding(request.embedding[0])
        # The ONNX run and the RLEs in a thread: the replica's loop stays free for other calls.
        return await asyncio.to_thread(self._decode, embedding, request)

    def _decode(self, embedding: np.ndarray, request: DecodeRequest) -> DecodeResult:
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
