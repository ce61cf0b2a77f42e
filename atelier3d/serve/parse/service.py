"""The parsing service: body and garment separation of a session's character.

It works on the SegmentService's sessions (same ids, same images): the character's mask is an
object's selected candidate or an RLE, and the image and mask go to the HumanParser deployment
through its handle. Results stay with their session and expire with it, at most
``sessions.max_parses`` per session (the oldest goes first). Their images (parse map, pose map,
cut-outs, ZIP) are encoded when first asked for, off the event loop, and kept.

The body itself is only ever returned as structure (parse map, pose map), never generated.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import zipfile
from collections.abc import Callable
from typing import Literal
from urllib.parse import quote

import numpy as np

from atelier3d import rle
from atelier3d.api.common import RLE
from atelier3d.api.parse import ParsePart, ParseRequest, ParseResponse, ParseTimings
from atelier3d.errors import NotFound
from atelier3d.imaging import encode_png
from atelier3d.serve.faults import call_idempotent
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import Session, StoredParse, new_id
from atelier3d.stages.parse import (
    LABELS,
    ParseResult,
    Part,
    colorize,
    hidden_region,
    render_pose_map,
)

logger = logging.getLogger("ray.serve")

AssetKind = Literal["parse_map", "pose_map", "zip", "part", "completed"]

MEDIA_TYPES = {"zip": "application/zip"}  # everything else is PNG


def parse_url(session_id: str, parse_id: str, *rest: str) -> str:
    return "/".join(["/v1/sessions", quote(session_id, safe=""), "parses",
                     quote(parse_id, safe=""), *rest])


def _part_urls(session_id: str, parse_id: str, name: str) -> tuple[str, str]:
    base = parse_url(session_id, parse_id, "parts", quote(name, safe=""))
    return f"{base}.png", f"{base}/completed.png"


def _hidden_rle(part: Part, completed: np.ndarray | None) -> RLE | None:
    hidden = hidden_region(part.rgba, completed)
    return None if hidden is None else RLE(**rle.encode(hidden[None])[0])


def parts_zip(result: ParseResult) -> bytes:
    """Every cut-out as ``<name>.png``, completed versions as ``<name>.completed.png``, and
    ``parts.json`` (names, labels, boxes) to place them back on the image."""
    buffer = io.BytesIO()
    manifest = []
    # PNGs are compressed already: stored, not deflated again.
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for part in result.parts:
            archive.writestr(f"{part.name}.png", encode_png(part.rgba))
            completed = result.completed.get(part.name)
            if completed is not None:
                archive.writestr(f"{part.name}.completed.png", encode_png(completed))
            manifest.append({"name": part.name, "labels": [LABELS[i] for i in part.labels],
                             "box_xyxy": list(part.box), "completed": completed is not None})
        archive.writestr("parts.json", json.dumps({"size_hw": list(result.size),
                                                   "parts": manifest}, indent=1))
    return buffer.getvalue()


def asset_renderer(result: ParseResult, kind: AssetKind,
                   part: str | None = None) -> Callable[[], bytes]:
    """What encodes one asset of ``result`` (to run in a thread); 404 if it does not exist."""
    if kind == "parse_map":
        return lambda: encode_png(colorize(result.label_map))
    if kind == "pose_map":
        return lambda: encode_png(render_pose_map(result.pose, result.size))
    if kind == "zip":
        return lambda: parts_zip(result)
    parts = {p.name: p for p in result.parts}
    if part not in parts:
        present = ", ".join(parts) or "none"
        raise NotFound(f"no part {part!r} in this parse (it has: {present})")
    if kind == "completed":
        completed = result.completed.get(part)
        if completed is None:
            raise NotFound(f"nothing hides part {part!r}: it has no completed version")
        return lambda: encode_png(completed)
    return lambda: encode_png(parts[part].rgba)


class ParseService:
    def __init__(self, segmentation: SegmentService, parser) -> None:
        self.segmentation = segmentation
        self.config = segmentation.config
        self.store = segmentation.store
        self.parser = parser
        self.parse_seconds = 3.0  # running estimate, for progress bars

    async def parse(self, session_id: str, request: ParseRequest) -> ParseResponse:
        start = time.perf_counter()
        session = await self.store.load(session_id)
        mask = self.segmentation.source_mask(session, request, "select the character first")
        return await self.parse_image(session_id, session.image, mask, request.object_id,
                                      request.groups, request.complete_occlusions, start,
                                      recorded=request)

    async def parse_image(self, session_id: str, image: np.ndarray, mask: np.ndarray,
                          object_id: str | None = None, groups: list[str] | None = None,
                          complete_occlusions: bool | None = None,
                          start: float | None = None,
                          recorded: ParseRequest | None = None) -> ParseResponse:
        """Parses ``image`` under ``mask`` and keeps the result with the session: the session's
        own image (``recorded``: the request a recipe replays), or one made from it (an edit's
        result, e.g. a T-pose)."""
        start = time.perf_counter() if start is None else start
        result: ParseResult = await call_idempotent(
            lambda: self.parser.parse.remote(image, mask, None, groups, complete_occlusions),
            "parse")
        parse_id = new_id("prs")
        total_ms = (time.perf_counter() - start) * 1000
        response = self._response(session_id, parse_id, object_id, result, total_ms)
        stored = StoredParse(response, result)
        if recorded is not None:  # a parse of the session's own image, as a recipe replays it
            stored.mask, stored.request = rle.encode(mask[None])[0], recorded
        await self.store.update(session_id, lambda s: self._keep(s, parse_id, stored))
        self.parse_seconds = 0.7 * self.parse_seconds + 0.3 * total_ms / 1000
        logger.info("session %s: parse %s, %d labels, %d parts in %.0f ms", session_id[:10],
                    parse_id[:10], len(result.labels), len(result.parts), total_ms)
        return response

    @staticmethod
    def _response(session_id: str, parse_id: str, object_id: str | None, result: ParseResult,
                  total_ms: float) -> ParseResponse:
        parts = []
        for part in result.parts:
            url, completed_url = _part_urls(session_id, parse_id, part.name)
            x0, y0, x1, y1 = part.box
            parts.append(ParsePart(
                name=part.name, labels=[LABELS[i] for i in part.labels],
                bbox=(x0, y0, x1 - x0, y1 - y0), url=url,
                completed_url=completed_url if part.name in result.completed else None,
                hidden=_hidden_rle(part, result.completed.get(part.name)),
            ))
        return ParseResponse(
            parse_id=parse_id,
            object_id=object_id,
            labels=result.labels,
            masks={name: RLE(**encoded) for name, encoded in result.rles.items()},
            keypoints=result.keypoints,
            parts=parts,
            checks=result.checks,
            parse_map_url=parse_url(session_id, parse_id, "parse_map.png"),
            pose_map_url=parse_url(session_id, parse_id, "pose_map.png"),
            zip_url=parse_url(session_id, parse_id, "parts.zip"),
            timings_ms=ParseTimings(**result.timings_ms, total_ms=total_ms),
        )

    def _keep(self, session: Session, parse_id: str, stored: StoredParse) -> None:
        session.parses[parse_id] = stored
        while len(session.parses) > self.config.sessions.max_parses:
            session.parses.popitem(last=False)

    def _found(self, session: Session, parse_id: str) -> StoredParse:
        stored = session.parses.get(parse_id)
        if stored is None:
            raise NotFound(f"parse not found (a session keeps its last "
                           f"{self.config.sessions.max_parses})")
        return stored

    def get(self, session_id: str, parse_id: str) -> StoredParse:
        """From this replica's copy of the session (synchronous: the UI's)."""
        return self._found(self.store.get(session_id), parse_id)

    async def load(self, session_id: str, parse_id: str) -> StoredParse:
        return self._found(await self.store.load(session_id), parse_id)

    async def get_parse(self, session_id: str, parse_id: str) -> ParseResponse:
        return (await self.load(session_id, parse_id)).response

    async def asset(self, session_id: str, parse_id: str, kind: AssetKind,
                    part: str | None = None) -> tuple[bytes, str]:
        """``(bytes, media type)`` of one image (or the ZIP) of a parse."""
        stored = await self.load(session_id, parse_id)
        key = (kind, part)
        data = stored.assets.get(key)
        if data is None:
            data = await asyncio.to_thread(asset_renderer(stored.result, kind, part))
            stored.assets[key] = data
        return data, MEDIA_TYPES.get(kind, "image/png")
