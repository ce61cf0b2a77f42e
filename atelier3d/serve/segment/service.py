"""The segmentation service: what the Gateway's HTTP routes and the Gradio UI both call.

It owns the session store (in this replica's memory, or in Redis: ``build_store``) and talks to
the SamEncoder and SamDecoder deployments through their handles. The embedding never passes
through this process: the encoder's result is turned into an object reference (owned here, so it
outlives encoder replicas that scale down) and only that reference travels with each click. With
Redis sessions the reference stays this replica's: another replica serving the session re-encodes
from the stored image once (a miss in ``ray_atelier_gateway_embedding_total``).

Changes to a session go through ``store.update`` (a read-modify-write, under the session's lock
with Redis); reads through ``store.load``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

import numpy as np
import ray

from atelier3d import rle
from atelier3d.api.common import MaskSource
from atelier3d.api.segment import (
    CutoutRequest,
    ObjectState,
    SegmentRequest,
    SegmentResponse,
    SessionInfo,
    Timings,
)
from atelier3d.config import AppConfig
from atelier3d.errors import (
    BadRequest,
    Conflict,
    EmbeddingLostError,
    PayloadTooLarge,
    Unavailable,
)
from atelier3d.imaging import decode_image, encode_png
from atelier3d.metrics import count_gateway_embedding
from atelier3d.serve.faults import call_idempotent
from atelier3d.serve.sessions import build_store
from atelier3d.serve.sessions.session import (
    SegObject,
    Session,
    Step,
    new_id,
)
from atelier3d.stages.segment import DecodeRequest, DecodeResult, mask_to_logits, routed

logger = logging.getLogger("ray.serve")

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


class SegmentService:
    def __init__(self, config: AppConfig, encoder, decoder) -> None:
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.store = build_store(config)
        self.encode_seconds = 5.0  # running estimate, for progress bars

    # ---- sessions ------------------------------------------------------------------------

    async def create_session(self, data: bytes, client: str) -> SessionInfo:
        if len(data) > self.config.limits.max_upload_bytes:
            raise PayloadTooLarge(
                f"upload is {len(data)} bytes, the limit is {self.config.limits.max_upload_bytes}"
            )
        limits = self.config.limits
        image = await asyncio.to_thread(decode_image, data, limits.max_pixels,
                                        max_aspect_ratio=limits.max_aspect_ratio)
        session = await self.store.create(client, image, data)
        self._start_encode(session)
        logger.info("session %s: %dx%d image", session.session_id[:10], *image.shape[1::-1])
        return self.session_info(session)

    def session_info(self, session: Session) -> SessionInfo:
        if session.embedding_ref is not None:
            status = "ready"
        elif session.embedding_failed:
            status = "failed"
        else:
            status = "pending"
        return SessionInfo(
            session_id=session.session_id,
            width=session.size[1],
            height=session.size[0],
            embedding=status,
            objects=list(session.objects),
            expires_in_s=self.store.expires_in(session),
        )

    async def get_session(self, session_id: str) -> SessionInfo:
        return self.session_info(await self.store.load(session_id))

    async def wait_ready(self, session_id: str) -> SessionInfo:
        session = await self.store.load(session_id)
        await self._embedding(session)
        return self.session_info(session)

    async def delete_session(self, session_id: str) -> None:
        await self.store.remove(session_id)

    def encode_progress(self, session_id: str) -> float:
        """0..1 estimate of the encode's progress (time-based: one forward pass has no steps)."""
        session = self.store.get(session_id)
        if session.embedding_ref is not None:
            return 1.0
        started = getattr(session.embedding_task, "started_at", time.monotonic())
        return min(0.95, (time.monotonic() - started) / max(self.encode_seconds, 1e-3))

    # ---- embeddings ----------------------------------------------------------------------

    def _start_encode(self, session: Session) -> None:
        session.embedding_failed = False
        session.embedding_task = asyncio.create_task(self._encode(session))
        session.embedding_task.started_at = time.monotonic()

    async def _encode(self, session: Session) -> None:
        start = time.monotonic()
        try:
            ref = await self.encoder.encode.remote(session.image)._to_object_ref()
            # Wait for the result without fetching its 4 MiB here; the decoders fetch it.
            while not ray.wait([ref], timeout=0, fetch_local=False)[0]:
                await asyncio.sleep(0.01)
        except Exception:
            session.embedding_failed = True
            raise
        session.embedding_ref = ref
        elapsed = time.monotonic() - start
        self.encode_seconds = 0.7 * self.encode_seconds + 0.3 * elapsed
        self._evict_embeddings()

    def _evict_embeddings(self) -> None:
        resident = self.store.resident_embeddings()
        excess = len(resident) - self.config.sessions.max_resident_embeddings
        for session in resident[: max(0, excess)]:
            session.embedding_ref = None  # recomputed from the stored image if used again

    async def _embedding(self, session: Session) -> ray.ObjectRef:
        if session.embedding_ref is not None:
            count_gateway_embedding(hit=True)
        while session.embedding_ref is None:
            task = session.embedding_task
            if task is None or task.done():
                # Evicted, lost, or (Redis sessions) never encoded by this replica: re-encode.
                count_gateway_embedding(hit=False)
                self._start_encode(session)
                task = session.embedding_task
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.sam.encode_timeout_s)
            except TimeoutError:
                raise Unavailable(
                    "the image is still being encoded; retry shortly", retry_after_s=5
                ) from None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("encoding failed for session %s", session.session_id[:10])
                raise Unavailable(f"image encoding failed: {exc}", retry_after_s=5) from exc
        return session.embedding_ref

    # ---- segmentation --------------------------------------------------------------------

    def _check_prompt(self, session: Session, request: SegmentRequest) -> None:
        height, width = session.size
        if len(request.points) > self.config.limits.max_points:
            raise PayloadTooLarge(f"at most {self.config.limits.max_points} points per request, "
                                  f"not {len(request.points)}")
        for x, y in request.points:
            if not (0 <= x <= width and 0 <= y <= height):
                raise BadRequest(f"point ({x}, {y}) lies outside the {width}x{height} image")
        if request.box is not None:
            x0, y0, x1, y1 = request.box
            if not (0 <= x0 <= width and 0 <= x1 <= width and 0 <= y0 <= height
                    and 0 <= y1 <= height):
                raise BadRequest(f"box {list(request.box)} lies outside the {width}x{height} image")

    async def segment(self, session_id: str, request: SegmentRequest) -> SegmentResponse:
        return (await self.segment_step(session_id, request))[0]

    async def segment_step(self, session_id: str, request: SegmentRequest
                           ) -> tuple[SegmentResponse, ObjectState | None]:
        """``segment``, and the object's state after the step (``None`` without an object),
        read in the same store update, so the UI need not load the session again to show it."""
        start = time.perf_counter()
        session = await self.store.load(session_id)
        self._check_prompt(session, request)
        target = session.get_object(request.object_id) if request.object_id else None
        mask_logits = None
        if request.refine:
            current = target.current
            if current is None:
                raise Conflict("nothing to refine: the object has no mask yet")
            if current.low_res is not None:
                mask_logits = current.low_res[current.selected]
            else:  # a step the browser decoded: only its masks were recorded
                mask = rle.decode_own(current.candidates[current.selected].rle.model_dump())
                mask_logits = mask_to_logits(mask)
        elif request.mask_input is not None:
            mask = rle.decode(request.mask_input.model_dump(), session.size)
            mask_logits = mask_to_logits(mask)

        ref = await self._embedding(session)
        waited = time.perf_counter()
        decode_request = DecodeRequest(
            embedding=[ref],
            size=session.size,
            # As sent: small lists pickle cheaper than arrays; decoder_prompt converts once.
            points=request.points or None,
            labels=request.labels or None,
            box=request.box,
            mask_logits=mask_logits,
            multimask=request.multimask,
            return_low_res=target is not None,
        )
        result = await self._decode(session, decode_request)
        candidates = result.candidates
        selected = result.best
        state = None
        if target is not None:
            step = Step(
                points=[tuple(p) for p in request.points],
                labels=list(request.labels),
                box=request.box,
                candidates=candidates,
                low_res=result.low_res,
                selected=selected,
                refine=request.refine,
                mask_input=request.mask_input.model_dump() if request.mask_input else None,
                multimask=request.multimask,
            )

            def push(session: Session) -> ObjectState:
                session.get_object(request.object_id).push(step)
                return self.object_state(session, request.object_id)

            state = await self.store.update(session_id, push)
        end = time.perf_counter()
        response = SegmentResponse(
            masks=candidates,
            selected=selected,
            object_id=request.object_id,
            step=state.step if state is not None else None,
            timings_ms=Timings(
                wait_embedding_ms=(waited - start) * 1000,
                decode_ms=result.decode_ms,
                total_ms=(end - start) * 1000,
            ),
        )
        return response, state

    async def _decode(self, session: Session, request: DecodeRequest) -> DecodeResult:
        def decode() -> Awaitable[DecodeResult]:
            return routed(self.decoder, request).decode.remote(request)

        try:
            return await call_idempotent(decode, "decode")
        except EmbeddingLostError:
            # The object is gone (node died, object store evicted it, its encoder replica died
            # mid-encode): recompute from the stored image, never fail.
            logger.warning("embedding of session %s lost; re-encoding", session.session_id[:10])
            session.embedding_ref = None
            request.embedding = [await self._embedding(session)]
            return await call_idempotent(decode, "decode")

    # ---- objects and history --------------------------------------------------------------

    def object_state(self, session: Session, object_id: str) -> ObjectState:
        obj = session.get_object(object_id)
        step = obj.current
        return ObjectState(
            object_id=object_id,
            step=obj.cursor,
            can_undo=obj.cursor > 0,
            can_redo=obj.cursor < len(obj.steps),
            points=list(step.points) if step else [],
            labels=list(step.labels) if step else [],
            box=step.box if step else None,
            masks=list(step.candidates) if step else [],
            selected=step.selected if step else None,
        )

    async def create_object(self, session_id: str) -> ObjectState:
        object_id = new_id("obj")

        def create(session: Session) -> ObjectState:
            session.objects[object_id] = SegObject(object_id, self.config.sessions.max_history)
            return self.object_state(session, object_id)

        return await self.store.update(session_id, create)

    async def get_object(self, session_id: str, object_id: str) -> ObjectState:
        return self.object_state(await self.store.load(session_id), object_id)

    async def edit_object(self, session_id: str, object_id: str, action: str) -> ObjectState:
        def edit(session: Session) -> ObjectState:
            obj = session.get_object(object_id)
            {"undo": obj.undo, "redo": obj.redo, "reset": obj.reset}[action]()
            return self.object_state(session, object_id)

        return await self.store.update(session_id, edit)

    async def select(self, session_id: str, object_id: str, index: int) -> ObjectState:
        def select(session: Session) -> ObjectState:
            step = session.get_object(object_id).current
            if step is None:
                raise Conflict("the object has no masks to choose from yet")
            if index >= len(step.candidates):
                raise BadRequest(
                    f"candidate {index} does not exist (there are {len(step.candidates)})")
            step.selected = index
            return self.object_state(session, object_id)

        return await self.store.update(session_id, select)

    async def delete_object(self, session_id: str, object_id: str) -> None:
        def delete(session: Session) -> None:
            session.get_object(object_id)
            del session.objects[object_id]

        await self.store.update(session_id, delete)

    # ---- export ---------------------------------------------------------------------------

    @staticmethod
    def source_mask(session: Session, source: MaskSource, empty: str) -> np.ndarray:
        """The ``(H, W)`` mask a request names (its RLE, or its object's selected candidate);
        400 if it is empty (``empty`` says why that matters), 409 if the object has none yet."""
        if source.object_id is not None:
            step = session.get_object(source.object_id).current
            if step is None:
                raise Conflict("the object has no mask yet")
            mask = rle.decode_own(step.candidates[step.selected].rle.model_dump())
        else:
            mask = rle.decode(source.rle.model_dump(), session.size)
        if not mask.any():
            raise BadRequest(f"the mask is empty: {empty}")
        return mask

    async def auto_mask(self, image: np.ndarray, inset: float = 0.02) -> np.ndarray:
        """SAM's best mask for "the thing in this picture": a box over the whole image (inset a
        little so the border is not the object). For images without alpha sent to 3D, e.g. an
        edit result on a plain background."""
        height, width = image.shape[:2]
        dx, dy = inset * width, inset * height
        ref = await self.encoder.encode.remote(image)._to_object_ref()
        result = await self.decoder.decode.remote(DecodeRequest(
            embedding=[ref], size=(height, width), points=None, labels=None,
            box=(dx, dy, width - dx, height - dy), mask_logits=None,
            multimask=True, return_low_res=False,
        ))
        mask = rle.decode_own(result.candidates[result.best].rle.model_dump())
        if not mask.any():
            raise BadRequest("no object found in the image: send a cut-out (an image with alpha) "
                             "or a session object")
        return mask

    async def cutout(self, session_id: str, request: CutoutRequest) -> bytes:
        session = await self.store.load(session_id)
        mask = self.source_mask(session, request, "nothing to cut out")
        return await asyncio.to_thread(
            cutout_png, session.image, mask, request.background, request.crop
        )


def cutout_png(image: np.ndarray, mask: np.ndarray, background: str, crop: bool) -> bytes:
    """The masked pixels as RGBA (transparent background) or RGB on a plain colour."""
    if background == "transparent":
        out = np.dstack([image, mask.astype(np.uint8) * 255])
    else:
        out = np.where(mask[..., None], image, np.array(BACKGROUNDS[background], np.uint8))
    if crop:
        ys, xs = np.nonzero(mask)
        out = out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return encode_png(np.ascontiguousarray(out))
