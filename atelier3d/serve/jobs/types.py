"""What a job is: its kind, its state and results, the events it goes through, its API view.

A job's events are typed where they are made (``Queued``, ``Started``, ``Progress``,
``ArtifactReady``, ``Retrying``, ``TakenOver``, ``Finished``); ``Job.record`` turns one into what
the NDJSON/SSE stream sends, ``{"seq", "job_id", "status", "progress", "type", <the event's
fields>, "eta_s"}``, and keeps it in ``Job.events``, the stream's log.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from atelier3d.api.common import ErrorBody
from atelier3d.api.jobs import JobArtifact, JobState, JobStatus
from atelier3d.config import JobKindSettings

FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
JOB_GONE = "job not found (its session may have expired)"


@dataclass
class Artifact:
    media_type: str
    data: bytes
    meta: dict


@dataclass
class JobKind:
    """What a kind of job calls and how its stages add up to one progress fraction."""

    name: str
    settings: JobKindSettings
    # request -> the deployment's streaming response (a DeploymentResponseGenerator)
    start: Callable[[Any], Any]
    stage_weights: dict[str, float]  # unknown stages count for nothing
    mean_seconds: float = 30.0  # running estimate of a job's run time, for ETAs
    # each stage's time in this server's finished jobs (a moving average), for the weights
    measured_ms: dict[str, float] = field(default_factory=dict)

    def weights(self) -> dict[str, float]:
        """Each stage's share of a job's time: as measured on this server's finished jobs once
        there are any (so the progress, and the ETA read from it, moves as the time does: a
        volume decode that takes half the job takes half the bar), else the stated shares."""
        total = sum(self.measured_ms.values())
        if total <= 0:
            return self.stage_weights
        return {stage: ms / total for stage, ms in self.measured_ms.items()}

    def measured(self, stage_ms: dict[str, float]) -> None:
        """Adds a finished job's stage times to the moving average."""
        for stage, ms in stage_ms.items():
            before = self.measured_ms.get(stage)
            self.measured_ms[stage] = ms if before is None else 0.7 * before + 0.3 * ms


def streaming_kind(name: str, settings: JobKindSettings, handle: Any, method: str,
                   stage_weights: dict[str, float]) -> JobKind:
    """A kind whose jobs are one streaming call of ``method`` on a deployment ``handle``."""

    def start(request: Any) -> Any:
        return getattr(handle.options(stream=True), method).remote(request)

    return JobKind(name=name, settings=settings, start=start, stage_weights=stage_weights)


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(repr(payload).encode()).hexdigest()


# ---- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job; ``payload`` is what the stream sends of it."""

    type: ClassVar[str]

    def payload(self) -> dict[str, Any]:
        return {"type": self.type, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class Queued(JobEvent):
    """Accepted and waiting for a free slot of its kind."""

    type: ClassVar[str] = "queued"
    queue_position: int  # jobs ahead of this one


@dataclass(frozen=True)
class Started(JobEvent):
    """Dispatched to a model replica."""

    type: ClassVar[str] = "started"


@dataclass(frozen=True)
class Progress(JobEvent):
    """One step of a stage done (``step`` of ``total``), as the model reported it; on part
    ``part`` of ``parts`` where the job makes several (a layered mesh)."""

    type: ClassVar[str] = "progress"
    stage: str
    step: int
    total: int
    part: int | None = None
    parts: int | None = None

    def payload(self) -> dict[str, Any]:
        return {key: value for key, value in super().payload().items() if value is not None}


@dataclass(frozen=True)
class ArtifactReady(JobEvent):
    """An intermediate result is there (its bytes at the result URL, not in the event)."""

    type: ClassVar[str] = "artifact"
    name: str
    media_type: str
    meta: dict


@dataclass(frozen=True)
class Retrying(JobEvent):
    """The job's replica was lost: it runs again from the start."""

    type: ClassVar[str] = "retrying"
    attempt: int
    reason: str


@dataclass(frozen=True)
class TakenOver(JobEvent):
    """The Gateway replica it was queued on was lost: another replica queues it now."""

    type: ClassVar[str] = "taken_over"
    reason: str


@dataclass(frozen=True)
class Finished(JobEvent):
    """The last event: its type is the job's final status; ``error`` only when it failed."""

    status: JobStatus
    error: dict | None = None

    def payload(self) -> dict[str, Any]:
        return {"type": self.status, **({"error": self.error} if self.error is not None else {})}


# ---- the job -----------------------------------------------------------------------------------


@dataclass
class Job:
    job_id: str
    kind: JobKind
    session_id: str | None
    client: str
    fingerprint: str
    created_at: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    stage: str | None = None
    step: int = 0
    total: int = 0
    progress: float = 0.0
    queue_position: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: dict | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    result: Artifact | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # as sent: the stream's log
    task: asyncio.Task | None = None
    idempotency: tuple[str, str] | None = None  # (owner, key) while the key maps to this job
    remote: bool = False  # a view of a job another replica runs (from its Redis record)
    stopped_error: dict | None = None  # why it fails when its replica stops before it ends
    recorded_eta: float | None = None  # a remote job's ETA, as of its last event
    events_sent: int = 0  # events written to Redis so far
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_report: float = 0.0  # perf_counter of the last progress report (or the start)
    stage_done: dict[str, float] = field(default_factory=dict)  # stage -> fraction done
    request: dict | None = None  # the API body as submitted (a session's recipe reads it)
    stage_weights: dict[str, float] = field(default_factory=dict)  # the kind's, as it started

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def eta_s(self) -> float | None:
        if self.finished:
            return 0.0
        if self.remote:
            return self.recorded_eta
        if self.status == "running" and self.started_at is not None and self.progress >= 0.05:
            elapsed = time.time() - self.started_at
            return max(0.0, elapsed / self.progress - elapsed)
        mean = self.kind.mean_seconds
        if self.status == "running":
            return mean
        ahead = self.queue_position or 0
        # Jobs ahead leave ``max_running`` at a time; then this one runs.
        return mean * (ahead // self.kind.settings.max_running + 1)

    def record(self, event: JobEvent) -> dict:
        """Adds ``event``, as the stream sends it, to the job's log and wakes its followers."""
        sent = {"seq": len(self.events), "job_id": self.job_id, "status": self.status,
                "progress": round(self.progress, 4), **event.payload()}
        eta = self.eta_s()
        sent["eta_s"] = round(eta, 2) if eta is not None else None
        self.events.append(sent)
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()
        return sent

    async def next_event(self, index: int) -> None:
        """Waits until the log holds more than ``index`` events, or the job has finished."""
        wake = self._wake
        if index < len(self.events) or self.finished:
            return
        await wake.wait()


# ---- the API's view ----------------------------------------------------------------------------


def job_url(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/jobs", job_id, *rest])


def job_state(job: Job) -> JobState:
    succeeded = job.status == "succeeded" and job.result is not None
    return JobState(
        job_id=job.job_id,
        kind=job.kind.name,
        session_id=job.session_id,
        status=job.status,
        stage=job.stage,
        step=job.step,
        total=job.total,
        progress=round(job.progress, 4),
        queue_position=job.queue_position,
        eta_s=job.eta_s(),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=ErrorBody(**job.error) if job.error else None,
        artifacts=[
            JobArtifact(name=name, media_type=a.media_type, meta=a.meta,
                        url=job_url(job.job_id, f"result?artifact={name}"))
            for name, a in job.artifacts.items()
        ],
        result_url=job_url(job.job_id, "result") if succeeded else None,
        result_meta=job.result.meta if succeeded else None,
        stage_ms={k: round(v, 1) for k, v in job.stage_ms.items()},
        events_url=job_url(job.job_id, "events"),
    )
