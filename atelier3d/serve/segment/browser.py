"""What a browser needs to run SAM's prompt decoder itself, and the route that records its steps.

SAM's heavy encoder runs once per image on the server; its ~4M-parameter prompt decoder can run
wherever the user is. The Segment tab fetches the same ONNX graph the SamDecoder replicas run
(at a URL keyed by the graph's hash, so browsers cache it for good), the session's embedding
once per image (float16: 2 MiB instead of 4), and onnxruntime-web from this server (installed
from npm by ``make install``; nothing is loaded from elsewhere at run time). Each step it decodes
is recorded here with one small request, so the API, the cut-out, parse, edit and mesh see the
same objects as after a server click.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from atelier3d import rle
from atelier3d.api.segment import (
    DecoderGraph,
    DecoderGraphs,
    MaskCandidate,
    ObjectState,
    RecordStepRequest,
)
from atelier3d.errors import NotFound
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import Session, Step
from atelier3d.stages.segment import mask_candidates

STATIC_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"
ORT_PACKAGE = STATIC_DIR / "node_modules" / "onnxruntime-web"
# The runtime files the page may load: the WASM build, and the WebGPU one where it runs.
ORT_FILES = {
    "ort.wasm.min.mjs", "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
    "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
}
PAGE_SCRIPTS = {"segment_browser.js", "segment_keys.js"}
IMMUTABLE = "public, max-age=31536000, immutable"
EMBEDDING_SHAPE = (1, 256, 64, 64)
MEDIA_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}


def ort_version() -> str | None:
    """The installed onnxruntime-web's version, or None when ``make install`` has not run npm."""
    manifest = ORT_PACKAGE / "package.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["version"]


@dataclass(frozen=True)
class Graph:
    data: bytes
    sha256: str

    def describe(self) -> DecoderGraph:
        return DecoderGraph(url=f"/v1/segment/decoder/{self.sha256}.onnx", sha256=self.sha256,
                            bytes=len(self.data))


class BrowserSegment:
    """The decoder graphs (fetched once from a SamDecoder replica), embeddings and recorded
    steps for clients that decode in the browser."""

    def __init__(self, service: SegmentService) -> None:
        self.service = service
        self._graphs: dict[bool, Graph] = {}
        self._lock = asyncio.Lock()

    async def graphs(self) -> dict[bool, Graph]:
        async with self._lock:
            if not self._graphs:
                for multimask in (True, False):
                    data = await self.service.decoder.graph.remote(multimask)
                    self._graphs[multimask] = Graph(data, hashlib.sha256(data).hexdigest())
        return self._graphs

    async def describe(self) -> DecoderGraphs:
        graphs = await self.graphs()
        return DecoderGraphs(multimask=graphs[True].describe(), single=graphs[False].describe(),
                             embedding_shape=EMBEDDING_SHAPE)

    async def graph(self, sha256: str) -> bytes:
        for graph in (await self.graphs()).values():
            if graph.sha256 == sha256:
                return graph.data
        raise NotFound("no decoder graph has this hash (the server's model changed?)")

    async def embedding(self, session_id: str) -> np.ndarray:
        """The session's image embedding as float16 ``(1, 256, 64, 64)``; waits for the encode."""
        session = await self.service.store.load(session_id)
        ref = await self.service._embedding(session)
        embedding = await ref
        return np.ascontiguousarray(embedding, np.float16).reshape(EMBEDDING_SHAPE)

    async def record_step(self, session_id: str, object_id: str,
                          request: RecordStepRequest) -> ObjectState:
        service = self.service
        session = await service.store.load(session_id)
        service._check_prompt(session, request)
        session.get_object(object_id)  # 404 before any work
        candidates = await asyncio.to_thread(_candidates, session, request)
        step = Step(points=[tuple(p) for p in request.points], labels=list(request.labels),
                    box=request.box, candidates=candidates, low_res=None,
                    selected=request.selected, multimask=len(candidates) > 1)

        def push(session: Session) -> ObjectState:
            session.get_object(object_id).push(step)
            return service.object_state(session, object_id)

        return await service.store.update(session_id, push)


def _candidates(session: Session, request: RecordStepRequest) -> list[MaskCandidate]:
    """The browser's masks, checked against the image and re-encoded as the decoder would."""
    masks = np.stack([rle.decode(m.rle.model_dump(), session.size) for m in request.masks])
    return mask_candidates(masks, np.array([m.score for m in request.masks]))


def build_browser_router(browser: BrowserSegment) -> APIRouter:
    router = APIRouter(responses=ERRORS, route_class=ApiRoute)

    @router.get("/v1/segment/decoder", response_model=DecoderGraphs,
                summary="The ONNX prompt decoder graphs the server runs (for in-browser clicks)")
    async def decoder_graphs() -> DecoderGraphs:
        return await browser.describe()

    @router.get("/v1/segment/decoder/{sha256}.onnx", response_class=Response,
                responses={200: {"content": {"application/octet-stream": {}}}})
    async def decoder_graph(sha256: str) -> Response:
        data = await browser.graph(sha256)
        return Response(data, media_type="application/octet-stream",
                        headers={"Cache-Control": IMMUTABLE})

    @router.get("/v1/sessions/{session_id}/embedding", response_class=Response,
                summary="The session's image embedding, float16, C order",
                responses={200: {"content": {"application/octet-stream": {}}}})
    async def embedding(session_id: str) -> Response:
        array = await browser.embedding(session_id)
        return Response(array.tobytes(), media_type="application/octet-stream", headers={
            "X-Embedding-Dtype": str(array.dtype),
            "X-Embedding-Shape": ",".join(str(n) for n in array.shape),
            "Cache-Control": "private, max-age=3600",
        })

    @router.post("/v1/sessions/{session_id}/objects/{object_id}/steps",
                 response_model=ObjectState, status_code=201,
                 summary="Record a step decoded by the client (its prompt and candidates)")
    async def record_step(session_id: str, object_id: str,
                          body: RecordStepRequest) -> ObjectState:
        return await browser.record_step(session_id, object_id, body)

    @router.get("/ui-static/ort/{version}/{name}", include_in_schema=False)
    async def ort_file(version: str, name: str) -> Response:
        if version != ort_version() or name not in ORT_FILES:
            raise NotFound("no such runtime file")
        return FileResponse(ORT_PACKAGE / "dist" / name, headers={"Cache-Control": IMMUTABLE},
                            media_type=MEDIA_TYPES[Path(name).suffix])

    @router.get("/ui-static/runtime.json", include_in_schema=False)
    async def runtime() -> dict:
        version = ort_version()
        if version is None:
            raise NotFound("onnxruntime-web is not installed (run make install)")
        return {"ort": f"/ui-static/ort/{version}/", "version": version}

    @router.get("/ui-static/{name}", include_in_schema=False)
    async def page_script(name: str) -> Response:
        if name not in PAGE_SCRIPTS:
            raise NotFound("no such file")
        return FileResponse(STATIC_DIR / name, media_type="text/javascript",
                            headers={"Cache-Control": "no-cache"})

    return router
