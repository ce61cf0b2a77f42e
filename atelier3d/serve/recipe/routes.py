"""``GET /v1/sessions/{id}/recipe`` (export) and ``POST /v1/recipes/replay`` (replay)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError

from atelier3d.api.recipe import Recipe, ReplayResponse
from atelier3d.errors import BadRequest, Unprocessable, validation_message
from atelier3d.serve.auth import client_key
from atelier3d.serve.http import ERRORS, ApiRoute
from atelier3d.serve.recipe.service import RecipeService


async def replay_form(request: Request) -> tuple[Recipe, bytes]:
    """Multipart: the file field ``image`` and the field ``recipe`` (JSON text or a file)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("send multipart/form-data with the fields 'image' and 'recipe'")
    form = await request.form(max_files=2, max_fields=2)
    image, recipe = form.get("image"), form.get("recipe")
    if image is None or isinstance(image, str):
        raise BadRequest("a replay needs a file field named 'image' (the recipe's image)")
    if recipe is None:
        raise BadRequest("a replay needs a field named 'recipe' (the exported JSON)")
    text = recipe if isinstance(recipe, str) else await recipe.read()
    try:
        parsed = Recipe.model_validate_json(text)
    except ValidationError as exc:
        raise Unprocessable(validation_message(exc.errors(), "recipe: ")) from None
    return parsed, await image.read()


def build_recipe_router(recipes: RecipeService) -> APIRouter:
    router = APIRouter(prefix="/v1", responses=ERRORS, tags=["recipes"], route_class=ApiRoute)

    @router.get("/sessions/{session_id}/recipe", response_model=Recipe,
                response_model_exclude_none=True,
                summary="The session as a recipe: clicks, parses, edits, meshes and the models")
    async def export_recipe(session_id: str) -> Recipe:
        return await recipes.export(session_id)

    @router.post("/recipes/replay", status_code=201, response_model=ReplayResponse,
                 summary="Replay a recipe on its image: a new session, its clicks and parses "
                 "done, its edits and meshes submitted as jobs",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "multipart/form-data": {"schema": {
                         "type": "object", "required": ["image", "recipe"],
                         "properties": {
                             "image": {"type": "string", "format": "binary"},
                             "recipe": {"type": "string", "description": "Recipe JSON"}}}},
                 }}})
    async def replay(request: Request) -> ReplayResponse:
        recipe, image = await replay_form(request)
        return await recipes.replay(recipe, image, client_key(request))

    return router
