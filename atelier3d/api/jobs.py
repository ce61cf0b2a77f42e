"""Long jobs (edit, mesh): submission, state, artifacts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atelier3d.api.common import ApiModel, ErrorBody

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobSubmitted(ApiModel):
    job_id: str
    status: JobStatus
    status_url: str
    events_url: str
    result_url: str


class JobArtifact(ApiModel):
    name: str
    media_type: str
    url: str
    meta: dict


class JobState(ApiModel):
    job_id: str
    kind: Literal["edit", "mesh", "character"]
    session_id: str | None
    status: JobStatus
    stage: str | None = Field(None, description="what runs now (denoise, volume_decode, ...)")
    step: int = Field(0, description="steps of the stage done")
    total: int = Field(0, description="steps in the stage")
    progress: float = Field(description="0..1 over the whole job")
    queue_position: int | None = Field(None, description="jobs ahead of this one (queued only)")
    eta_s: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: ErrorBody | None = None
    artifacts: list[JobArtifact] = Field(
        default_factory=list, description="intermediate results (e.g. the untextured shape)")
    result_url: str | None = Field(None, description="set once the job succeeded")
    result_meta: dict | None = None
    stage_ms: dict[str, float] = Field(default_factory=dict)
    events_url: str
