"""Gateway: the ingress deployment. FastAPI routes and the Gradio UI, built inside the replica.

The ASGI app is late-bound (``@serve.ingress()`` + ``__serve_build_asgi_app__``) because a
prebuilt Gradio app cannot be pickled into the deployment, and Ray's Gradio wrappers are broken
with Gradio 6.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier3d.config import AppConfig
from atelier3d.serve.character.service import CharacterService
from atelier3d.serve.edit.service import EditService
from atelier3d.serve.fair_use import FairUse
from atelier3d.serve.health import Health
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.sources import SourceResolver
from atelier3d.serve.mesh.service import MeshService
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.routes import build_api
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.redis_store import RedisSessionStore
from atelier3d.serve.ui.app import mount_ui

logger = logging.getLogger("ray.serve")

REPLICA_HEADER = "X-Atelier-Replica"
NODE_HEADER = "X-Atelier-Node"


def replica_identity() -> tuple[str, str]:
    """(this Gateway replica's id, its Ray node's id); placeholders outside a replica."""
    import ray

    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica (an in-process app in a test)
        replica = "local"
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return replica, node


class ReplicaHeaders:
    """Names the replica (and node) that served each HTTP response: with several Gateway
    replicas, what shows where a client's requests went (and whether routing is sticky)."""

    def __init__(self, app: ASGIApp, replica: str, node: str) -> None:
        self.app = app
        self.headers = [(REPLICA_HEADER.lower().encode(), replica.encode()),
                        (NODE_HEADER.lower().encode(), node.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_named)


class ClientGone:
    """A client that went away reads as ``http.disconnect``, as the ASGI spec says. Ray Serve's
    ``receive`` raises ``TaskCancelledError`` instead, which a streaming response (Gradio's
    heartbeat, the queue's event stream) lets out as an error with a traceback in the log on
    every reload of the page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def receive_or_gone() -> Message:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_gone, send)


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, config: dict, encoder: DeploymentHandle, decoder: DeploymentHandle,
                 parser: DeploymentHandle, editor: DeploymentHandle, shape3d: DeploymentHandle,
                 mesh_finish: DeploymentHandle | None = None):
        self.config = AppConfig.model_validate(config)
        self.service = SegmentService(self.config, encoder, decoder)
        self.parsing = ParseService(self.service, parser)
        store = self.service.store  # with Redis sessions, the buckets are shared there too
        shared = store.redis if isinstance(store, RedisSessionStore) else None
        self.fair_use = FairUse(self.config.fair_use, redis=shared,
                                prefix=self.config.sessions.redis_prefix)
        self.jobs = JobService(self.config.jobs, self.service.store, self.fair_use)
        sources = SourceResolver(self.service, self.jobs)
        self.editing = EditService(self.service, self.jobs, sources, editor)
        self.meshing = MeshService(self.service, self.jobs, sources, shape3d, mesh_finish)
        self.character = CharacterService(self.parsing, self.editing, self.meshing, self.jobs)
        self.health = Health({"sam_encoder": encoder, "sam_decoder": decoder,
                              "human_parser": parser, "image_editor": editor,
                              "shape3d": shape3d}, cache=self.config.cache_path,
                              without_model=[mesh_finish] if mesh_finish is not None else [])

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica (scale-down, upgrade), after the HTTP
        requests in flight drained and before ``graceful_shutdown_timeout_s`` runs out: the
        jobs this replica runs (tasks, not requests, so Serve does not wait for them) finish
        or fail as retryable, never just vanish."""
        await self.jobs.drain(self.config.jobs.drain_s)

    def __serve_build_asgi_app__(self):
        jobs = (self.jobs, self.editing, self.meshing)
        app = build_api(self.config, self.health, self.service, self.parsing, jobs, self.fair_use,
                        self.character)
        if self.config.ui:
            app = mount_ui(app, self.health, self.service, self.parsing, jobs, self.character)
        replica, node = replica_identity()
        app.add_middleware(ReplicaHeaders, replica=replica, node=node)
        app.add_middleware(ClientGone)
        return app
