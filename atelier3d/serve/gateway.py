"""Gateway: the ingress deployment. FastAPI routes and the Gradio UI, built inside the replica.

The ASGI app is late-bound (``@serve.ingress()`` + ``__serve_build_asgi_app__``) because a
prebuilt Gradio app cannot be pickled into the deployment, and Ray's Gradio wrappers are broken
with Gradio 6.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier3d.config import AppConfig
from atelier3d.serve.api import build_api
from atelier3d.serve.editing import EditService
from atelier3d.serve.fairuse import FairUse
from atelier3d.serve.jobs import JobService
from atelier3d.serve.meshing import MeshService
from atelier3d.serve.parsing import ParsingService
from atelier3d.serve.segmentation import SegmentationService
from atelier3d.serve.sources import SourceResolver

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


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, config: dict, encoder: DeploymentHandle, decoder: DeploymentHandle,
                 parser: DeploymentHandle, editor: DeploymentHandle, shape3d: DeploymentHandle):
        self.config = AppConfig.model_validate(config)
        self.service = SegmentationService(self.config, encoder, decoder)
        self.parsing = ParsingService(self.service, parser)
        self.fair_use = FairUse(self.config.fair_use)
        self.jobs = JobService(self.config.jobs, self.service.store, self.fair_use)
        sources = SourceResolver(self.service, self.jobs)
        self.editing = EditService(self.service, self.jobs, sources, editor)
        self.meshing = MeshService(self.service, self.jobs, sources, shape3d)

    def __serve_build_asgi_app__(self):
        app = build_api(self.service, self.config, self.parsing,
                        (self.jobs, self.editing, self.meshing), self.fair_use)
        if self.config.ui:
            from atelier3d.serve.ui import mount_ui

            app = mount_ui(app, self.service, self.parsing,
                           (self.jobs, self.editing, self.meshing))
        replica, node = replica_identity()
        app.add_middleware(ReplicaHeaders, replica=replica, node=node)
        return app
