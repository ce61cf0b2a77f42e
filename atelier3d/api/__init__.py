"""The ``/v1`` contract: pydantic request and response models, one module per stage.

Clients and the Gateway both import these; nothing here needs more than pydantic.
"""

from __future__ import annotations

from atelier3d.api.common import (
    RLE,
    ErrorBody,
    ErrorResponse,
    ImageSource,
    MaskSource,
    ModelInfo,
    ReadyInfo,
)
from atelier3d.api.edit import EditJobRequest
from atelier3d.api.jobs import JobArtifact, JobState, JobSubmitted
from atelier3d.api.mesh import MeshJobRequest, MeshPart
from atelier3d.api.parse import (
    Check,
    Keypoint,
    ParsePart,
    ParseRequest,
    ParseResponse,
    ParseTimings,
    Pose,
)
from atelier3d.api.recipe import Recipe, ReplayResponse
from atelier3d.api.segment import (
    CutoutRequest,
    DecoderGraph,
    DecoderGraphs,
    MaskCandidate,
    ObjectState,
    RecordedCandidate,
    RecordStepRequest,
    SegmentRequest,
    SegmentResponse,
    SelectRequest,
    SessionInfo,
    Timings,
)

__all__ = [
    "Check",
    "CutoutRequest",
    "DecoderGraph",
    "DecoderGraphs",
    "EditJobRequest",
    "ErrorBody",
    "ErrorResponse",
    "ImageSource",
    "JobArtifact",
    "JobState",
    "JobSubmitted",
    "Keypoint",
    "MaskCandidate",
    "MaskSource",
    "MeshJobRequest",
    "MeshPart",
    "ModelInfo",
    "ObjectState",
    "ParsePart",
    "ParseRequest",
    "ParseResponse",
    "ParseTimings",
    "Pose",
    "RLE",
    "ReadyInfo",
    "Recipe",
    "RecordStepRequest",
    "RecordedCandidate",
    "ReplayResponse",
    "SegmentRequest",
    "SegmentResponse",
    "SelectRequest",
    "SessionInfo",
    "Timings",
]
