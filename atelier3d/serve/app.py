"""``build_app``: the deployment graph, as a Ray Serve application builder.

``serve run atelier3d.serve.app:build_app`` or ``import_path`` in a Serve YAML; the YAML's
``args`` are validated as ``AppConfig`` and its ``deployments`` section sizes every deployment.
"""

from __future__ import annotations

from ray.serve import Application

from atelier3d.config import AppConfig
from atelier3d.deployments.human_parser import HumanParser
from atelier3d.deployments.image_editor import ImageEditor
from atelier3d.deployments.sam_decoder import SamDecoder
from atelier3d.deployments.sam_encoder import SamEncoder
from atelier3d.deployments.shape3d import Shape3D
from atelier3d.serve.gateway import Gateway


def build_app(args: dict | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    raw = config.model_dump(mode="json")
    encoder = SamEncoder.bind(raw)
    decoder = SamDecoder.bind(raw)
    parser = HumanParser.bind(raw)
    editor = ImageEditor.bind(raw)
    shape3d = Shape3D.bind(raw)
    return Gateway.bind(raw, encoder, decoder, parser, editor, shape3d)
