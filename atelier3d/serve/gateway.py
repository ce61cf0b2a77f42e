"""Gateway: the ingress deployment. FastAPI routes and the Gradio UI, built inside the replica.

The ASGI app is late-bound (``@serve.ingress()`` + ``__serve_build_asgi_app__``) because a
prebuilt Gradio app cannot be pickled into the deployment, and Ray's Gradio wrappers are broken
with Gradio 6.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

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
        return app
