"""``/v1/sessions/{id}/parse``: body and garment separation and its results."""

from __future__ import annotations

from fastapi import APIRouter, Response

from atelier3d.api.parse import ParseRequest, ParseResponse
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.parse.service import ParseService

PNG = {200: {"content": {"image/png": {}}}}


def build_parse_router(parsing: ParseService) -> APIRouter:
    """Body and garment separation: ``POST .../parse``, then its results under ``.../parses``."""
    router = APIRouter(prefix="/v1/sessions/{session_id}", responses=ERRORS, tags=["parsing"],
                       route_class=ApiRoute)

    @router.post("/parse", response_model=ParseResponse,
                 summary="Parse the character (an object's mask, or an RLE) into body labels, "
                 "keypoints and garment cut-outs")
    async def parse(session_id: str, body: ParseRequest) -> ParseResponse:
        return await parsing.parse(session_id, body)

    @router.get("/parses/{parse_id}", response_model=ParseResponse)
    async def get_parse(session_id: str, parse_id: str) -> ParseResponse:
        return await parsing.get_parse(session_id, parse_id)

    async def asset(session_id: str, parse_id: str, kind: str, part: str | None = None):
        data, media_type = await parsing.asset(session_id, parse_id, kind, part)
        return Response(content=data, media_type=media_type)

    @router.get("/parses/{parse_id}/parse_map.png", response_class=Response, responses=PNG,
                summary="The label map in the ATR palette, image-sized")
    async def parse_map(session_id: str, parse_id: str) -> Response:
        return await asset(session_id, parse_id, "parse_map")

    @router.get("/parses/{parse_id}/pose_map.png", response_class=Response, responses=PNG,
                summary="OpenPose-style skeleton on black, image-sized")
    async def pose_map(session_id: str, parse_id: str) -> Response:
        return await asset(session_id, parse_id, "pose_map")

    @router.get("/parses/{parse_id}/parts.zip", response_class=Response,
                responses={200: {"content": {"application/zip": {}}}},
                summary="Every cut-out, completed versions and a parts.json manifest")
    async def parts_zip(session_id: str, parse_id: str) -> Response:
        return await asset(session_id, parse_id, "zip")

    @router.get("/parses/{parse_id}/parts/{name}.png", response_class=Response, responses=PNG,
                summary="One part's RGBA cut-out, cropped to its bbox")
    async def part(session_id: str, parse_id: str, name: str) -> Response:
        return await asset(session_id, parse_id, "part", name)

    @router.get("/parses/{parse_id}/parts/{name}/completed.png", response_class=Response,
                responses=PNG, summary="The cut-out with its occluded part filled in")
    async def completed(session_id: str, parse_id: str, name: str) -> Response:
        return await asset(session_id, parse_id, "completed", name)

    return router
