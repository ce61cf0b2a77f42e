"""The Gateway's FastAPI app: every stage's ``/v1`` router, health, and the middleware."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from atelier3d.config import AppConfig
from atelier3d.serve.auth import ApiKeyMiddleware, KeyRing
from atelier3d.serve.character.routes import build_character_router
from atelier3d.serve.character.service import CharacterService
from atelier3d.serve.edit.routes import build_edit_router
from atelier3d.serve.edit.service import EditService
from atelier3d.serve.fair_use import FairUse, FairUseMiddleware
from atelier3d.serve.health import Health, build_health_router
from atelier3d.serve.http import BodyLimitMiddleware, install_error_handlers
from atelier3d.serve.jobs.routes import build_jobs_router
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.mesh.routes import build_mesh_router
from atelier3d.serve.mesh.service import MeshService
from atelier3d.serve.openapi_links import document_links
from atelier3d.serve.parse.routes import build_parse_router
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.recipe.routes import build_recipe_router
from atelier3d.serve.recipe.service import RecipeService
from atelier3d.serve.segment.browser import BrowserSegment, build_browser_router
from atelier3d.serve.segment.routes import build_router
from atelier3d.serve.segment.service import SegmentService

JobServices = tuple[JobService, EditService, MeshService]

logger = logging.getLogger("ray.serve")


def build_api(config: AppConfig, health: Health, service: SegmentService,
              parsing: ParseService | None = None, jobs: JobServices | None = None,
              fair_use: FairUse | None = None,
              character: CharacterService | None = None) -> FastAPI:
    app = FastAPI(
        title="atelier3d",
        version="1",
        description="Interactive segmentation (SAM) and body/garment separation served on "
        "Ray Serve. Errors are "
        '`{"error": {"code", "message"}}`.',
    )
    install_error_handlers(app)
    app.include_router(build_health_router(health))
    app.include_router(build_router(service))
    app.include_router(build_browser_router(BrowserSegment(service)))
    if parsing is not None:
        app.include_router(build_parse_router(parsing))
    if jobs is not None:
        job_service, editing, meshing = jobs
        app.include_router(build_edit_router(editing))
        app.include_router(build_mesh_router(meshing))
        app.include_router(build_jobs_router(job_service))
        if parsing is not None:
            app.include_router(build_recipe_router(
                RecipeService(service, parsing, job_service, editing, meshing, health)))
    if character is not None:
        app.include_router(build_character_router(character))
    document_links(app)

    app.add_middleware(BodyLimitMiddleware, config=config)
    keys = KeyRing(config.auth)
    # Outermost first: the API key names the client (401 without one), then fair use counts
    # that client; both refuse before the body is read.
    app.add_middleware(FairUseMiddleware, fair_use=fair_use or FairUse(config.fair_use))
    if keys.enabled:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
        require_bearer_in_openapi(app)
        logger.info("API keys on: %d accepted key(s)", len(keys.digests))
        if config.ui and not config.auth.ui_users:
            logger.warning("API keys are on but the UI has no login (auth.ui_users): anyone who "
                           "reaches / can use the models through it")
    return app


def require_bearer_in_openapi(app: FastAPI) -> None:
    """Documents the bearer key on every /v1 operation of the OpenAPI."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "an API key of auth.api_keys"}}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
