"""``build_app``: the deployment graph, as a Ray Serve application builder.

``serve run atelier3d.serve.app:build_app`` or ``import_path`` in a Serve YAML; the YAML's
``args`` are validated as ``AppConfig`` and its ``deployments`` section sizes every deployment.
"""

from __future__ import annotations

from ray.serve import Application

from atelier3d.config import AppConfig
from atelier3d.deployments.edit import ImageEditor
from atelier3d.deployments.mesh import Shape3D
from atelier3d.deployments.mesh_finish import MeshFinish
from atelier3d.deployments.parse import HumanParser
from atelier3d.deployments.segment_decoder import SamDecoder
from atelier3d.deployments.segment_encoder import SamEncoder
from atelier3d.serve.gateway import Gateway

WEIGHTS = ("models", "cache_dir")  # what every model deployment reads besides its own section


def model_slice(config: AppConfig, section: str) -> dict:
    """The part of the config one model deployment reads. Serve restarts a deployment's replicas
    when its bound arguments change, so changing anything else (fair use, limits, the UI, another
    model) leaves them running."""
    return config.model_dump(mode="json", include={*WEIGHTS, section})


def build_app(args: dict | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    encoder = SamEncoder.bind(model_slice(config, "sam"))
    decoder = SamDecoder.bind(model_slice(config, "sam"))
    parser = HumanParser.bind(model_slice(config, "parsing"))
    editor = ImageEditor.bind(model_slice(config, "edit"))
    shape3d = Shape3D.bind(model_slice(config, "mesh"))
    # Bound whatever mesh.stages says: the Serve YAMLs size it, and Serve refuses a config that
    # sizes a deployment the application lacks. It loads no model (it idles under `single`).
    mesh_finish = MeshFinish.bind(model_slice(config, "mesh"))
    return Gateway.bind(config.model_dump(mode="json"), encoder, decoder, parser, editor, shape3d,
                        mesh_finish)
