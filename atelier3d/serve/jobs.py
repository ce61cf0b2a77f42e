"""Long jobs (edits, meshes): submit, queue, progress events, cancel, results.

The Gateway owns the queue, so a job's position and ETA are known: each kind runs at most
``jobs.<kind>.max_running`` jobs at once (the model replicas' total capacity, from the Serve
config), the rest wait in order, and beyond ``max_queued`` submissions get 503 + Retry-After.
A running job is one streaming call to its model deployment
(``handle.options(stream=True).<method>.remote(request)``, see
``atelier3d.deployments.streaming``); its progress reports become this job's events.
Cancelling cancels that call, and the replica stops at the pipeline's next step.

Jobs belong to a session (their source images came from it) and go with it; jobs without one
(an uploaded image) live ``jobs.ttl_s`` after they finish. Ids are ``secrets`` capabilities.
Submissions carry an optional idempotency key: the same key with the same request returns the
same job; with a different request, 409.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from atelier3d.config import JobKindSettings, JobSettings
from atelier3d.errors import ApiError, Conflict, NotFound, TooManyRequests, Unavailable
from atelier3d.metrics import observe_stage, set_jobs
from atelier3d.serve.auth import visible
from atelier3d.serve.schemas import ErrorBody, JobArtifact, JobState
from atelier3d.serve.sessions import Session, SessionStore, new_id

logger = logging.getLogger("ray.serve")

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


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
    events: list[dict] = field(default_factory=list)
    task: asyncio.Task | None = None
    idempotency: tuple[str, str] | None = None  # (owner, key) while the key maps to this job
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _last_report: float = 0.0  # perf_counter of the last progress report (or the start)
    _stage_done: dict[str, float] = field(default_factory=dict)  # stage -> fraction done

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def eta_s(self) -> float | None:
        if self.finished:
            return 0.0
        if self.status == "running" and self.started_at is not None and self.progress >= 0.05:
            elapsed = time.time() - self.started_at
            return max(0.0, elapsed / self.progress - elapsed)
        mean = self.kind.mean_seconds
        if self.status == "running":
            return mean
        ahead = self.queue_position or 0
        # Jobs ahead leave ``max_running`` at a time; then this one runs.
        return mean * (ahead // self.kind.settings.max_running + 1)


def streaming_kind(name: str, settings: JobKindSettings, handle: Any, method: str,
                   stage_weights: dict[str, float]) -> JobKind:
    """A kind whose jobs are one streaming call of ``method`` on a deployment ``handle``."""

    def start(request: Any) -> Any:
        return getattr(handle.options(stream=True), method).remote(request)

    return JobKind(name=name, settings=settings, start=start, stage_weights=stage_weights)


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(repr(payload).encode()).hexdigest()


class KindQueue:
    """FIFO admission for one kind: at most ``max_running`` at once, the rest in order."""

    def __init__(self, settings: JobKindSettings, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.waiting: list[Job] = []
        self.running = 0
        self._wake = asyncio.Event()
        self.on_change = on_change

    def _changed(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()
        self.on_change()

    def admit(self, job: Job) -> None:
        if len(self.waiting) >= self.settings.max_queued:
            raise Unavailable(
                f"{len(self.waiting)} {job.kind.name} jobs are waiting already; retry later",
                retry_after_s=max(1.0, job.kind.mean_seconds),
            )
        self.waiting.append(job)

    def leave(self, job: Job) -> None:
        if job in self.waiting:
            self.waiting.remove(job)
            self._changed()

    async def acquire(self, job: Job) -> None:
        try:
            while not (self.waiting[0] is job and self.running < self.settings.max_running):
                await self._wake.wait()
        except BaseException:
            self.leave(job)
            raise
        self.waiting.pop(0)
        self.running += 1
        self._changed()

    def release(self) -> None:
        self.running -= 1
        self._changed()


class JobService:
    def __init__(self, settings: JobSettings, store: SessionStore) -> None:
        self.settings = settings
        self.store = store
        self.kinds: dict[str, JobKind] = {}
        self.queues: dict[str, KindQueue] = {}
        self.jobs: dict[str, Job] = {}
        self.keys: dict[tuple[str, str], str] = {}  # (owner, idempotency key) -> job id
        self.unowned: OrderedDict[str, Job] = OrderedDict()  # session-less jobs, oldest first
        store.on_drop.append(self._forget_session)

    def register(self, kind: JobKind) -> None:
        self.kinds[kind.name] = kind
        self.queues[kind.name] = KindQueue(kind.settings, self._announce_positions)

    # ---- submit -----------------------------------------------------------------------------

    async def submit(self, kind_name: str, build: Callable[[], Awaitable[Any]], payload: Any, *,
                     session: Session | None, client: str,
                     idempotency_key: str | None = None) -> Job:
        """Queues what ``build()`` makes (the deployment's request; its ``ApiError``s are the
        submission's 4xx) for the ``kind_name`` deployment. ``payload``, the API body as the user
        sent it, is what an idempotency key is checked against: a repeated submission returns
        the first job without building anything."""
        kind = self.kinds[kind_name]
        owner = session.session_id if session is not None else f"client:{client}"
        digest = fingerprint((kind_name, payload))
        if idempotency_key:
            existing = self.jobs.get(self.keys.get((owner, idempotency_key), ""))
            if existing is not None:
                if existing.fingerprint != digest:
                    raise Conflict("this Idempotency-Key was used for a different request")
                return existing
        request = await build()
        self._sweep_unowned()
        if session is not None:
            self._make_room(session)
        job = Job(new_id("job"), kind, session.session_id if session else None, client, digest)
        self.queues[kind_name].admit(job)
        self.jobs[job.job_id] = job
        if session is not None:
            session.jobs[job.job_id] = job
        else:
            self.unowned[job.job_id] = job
        if idempotency_key:
            self.keys[(owner, idempotency_key)] = job.job_id
            job.idempotency = (owner, idempotency_key)
        job.task = asyncio.create_task(self._run(job, request))
        job.task.add_done_callback(lambda _: self._settle(job))
        self._announce_positions()
        logger.info("job %s (%s) queued", job.job_id[:10], kind_name)
        return job

    def _make_room(self, session: Session) -> None:
        while len(session.jobs) >= self.settings.max_jobs_per_session:
            oldest = next((j for j in session.jobs.values() if j.finished), None)
            if oldest is None:
                raise TooManyRequests(
                    f"this session has {len(session.jobs)} unfinished jobs; wait or cancel one")
            self._forget(oldest)

    # ---- run ------------------------------------------------------------------------------

    async def _run(self, job: Job, request: Any) -> None:
        kind, queue = job.kind, self.queues[job.kind.name]
        try:
            await queue.acquire(job)
        except asyncio.CancelledError:
            self._finish(job, "cancelled")
            return
        job.status, job.started_at, job.queue_position = "running", time.time(), None
        job._last_report = time.perf_counter()
        self._emit(job, {"type": "started"})
        stream = None
        try:
            stream = kind.start(request)
            async for event in stream:
                self._on_event(job, event)
            kind.mean_seconds = 0.7 * kind.mean_seconds + 0.3 * (time.time() - job.started_at)
            self._finish(job, "succeeded")
        except asyncio.CancelledError:
            # Serve's response generator cancels the replica's request (which stops at the
            # pipeline's next step); an in-process generator was cancelled with this task.
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
            self._finish(job, "cancelled")
        except ApiError as exc:
            self._finish(job, "failed", {"code": exc.code, "message": exc.message})
        except Exception as exc:  # noqa: BLE001 - a job's failure is its own, never the server's
            logger.exception("job %s failed", job.job_id[:10])
            self._finish(job, "failed", {"code": "internal", "message": f"{type(exc).__name__}: "
                                                                        f"{str(exc)[:500]}"})
        finally:
            queue.release()

    def _settle(self, job: Job) -> None:
        """A task cancelled before it ever ran skips ``_run``'s handlers: finish it here."""
        if not job.finished:
            self.queues[job.kind.name].leave(job)
            self._finish(job, "cancelled")

    def _on_event(self, job: Job, event: dict) -> None:
        kind = event.get("type")
        if kind == "progress":
            stage, step, total = str(event["stage"]), int(event["step"]), int(event["total"])
            # A report comes when a step ends: the time since the previous one was this stage's.
            now = time.perf_counter()
            job.stage_ms[stage] = job.stage_ms.get(stage, 0.0) + (now - job._last_report) * 1000
            observe_stage(f"{job.kind.name}_{stage}", (now - job._last_report) * 1000)
            job._last_report = now
            job.stage, job.step, job.total = stage, step, total
            # From each stage's latest report, not from stage order: a layered mesh goes
            # through conditioning and denoising once per part, alternating.
            job._stage_done[stage] = min(1.0, step / max(total, 1))
            weights = job.kind.stage_weights
            done = sum(weights.get(name, 0.0) * part for name, part in job._stage_done.items())
            job.progress = max(job.progress, min(1.0, done))
            self._emit(job, {"type": "progress", "stage": stage, "step": step, "total": total})
        elif kind == "artifact":
            name = str(event["name"])
            job.artifacts[name] = Artifact(event["media_type"], event["data"], event["meta"])
            self._emit(job, {"type": "artifact", "name": name,
                             "media_type": event["media_type"], "meta": event["meta"]})
        elif kind == "result":
            job.result = Artifact(event["media_type"], event["data"], event["meta"])

    def _finish(self, job: Job, status: JobStatus, error: dict | None = None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        job.queue_position = None
        if status == "succeeded":
            job.progress = 1.0
        event: dict = {"type": status}
        if error is not None:
            event["error"] = error
        self._emit(job, event)
        logger.info("job %s %s", job.job_id[:10], status)

    # ---- progress ---------------------------------------------------------------------------

    def _emit(self, job: Job, event: dict) -> None:
        event = {"seq": len(job.events), "job_id": job.job_id, "status": job.status,
                 "progress": round(job.progress, 4), **event}
        eta = job.eta_s()
        event["eta_s"] = round(eta, 2) if eta is not None else None
        job.events.append(event)
        wake, job._wake = job._wake, asyncio.Event()
        wake.set()

    def _announce_positions(self) -> None:
        for name, queue in self.queues.items():
            set_jobs(name, queue.running, len(queue.waiting))
            for position, job in enumerate(queue.waiting):
                if job.queue_position != position and not job.finished:
                    job.queue_position = position
                    self._emit(job, {"type": "queued", "queue_position": position})

    async def follow(self, job_id: str, after: int = -1) -> AsyncIterator[dict]:
        """The job's events with ``seq > after``, then new ones as they come, until the end."""
        job = self.get(job_id)
        index = max(0, after + 1)  # never a negative index: that would count from the end
        while True:
            wake = job._wake
            while index < len(job.events):
                yield job.events[index]
                index += 1
            if job.finished:
                return
            await wake.wait()

    async def wait(self, job_id: str) -> Job:
        async for _ in self.follow(job_id):
            pass
        return self.get(job_id)

    # ---- lookup, cancel, results ------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        self._sweep_unowned()
        job = self.jobs.get(job_id)
        if job is None or not visible(job.client):  # another API key's job: as if not there
            raise NotFound("job not found (its session may have expired)")
        if job.session_id is not None:
            self.store.get(job.session_id)  # keeps the session alive while its jobs are used
        return job

    def get_in_session(self, session: Session, job_id: str) -> Job:
        """A job that must belong to ``session`` (as a source of another job)."""
        job = session.jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found in this session")
        return job

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.finished:
            raise Conflict(f"the job has already {job.status}")
        job.task.cancel()
        await asyncio.wait([job.task])
        return job

    def result(self, job_id: str, artifact: str | None = None) -> Artifact:
        job = self.get(job_id)
        if artifact is not None:
            found = job.artifacts.get(artifact)
            if found is None:
                present = ", ".join(job.artifacts) or "none yet"
                raise NotFound(f"no artifact {artifact!r} (the job has: {present})")
            return found
        if job.status == "succeeded" and job.result is not None:
            return job.result
        if job.status in ("queued", "running"):
            raise Conflict(f"the job is {job.status} ({job.progress:.0%}); wait for it first",
                           retry_after_s=max(1.0, job.eta_s() or 1.0))
        reason = f": {job.error['message']}" if job.error else ""
        raise Conflict(f"the job {job.status}{reason}; it has no result")

    # ---- expiry -----------------------------------------------------------------------------

    def _forget(self, job: Job) -> None:
        if not job.finished and job.task is not None:
            job.task.cancel()
        self.jobs.pop(job.job_id, None)
        self.unowned.pop(job.job_id, None)
        if job.idempotency is not None:
            self.keys.pop(job.idempotency, None)
        session = self.store.find(job.session_id) if job.session_id else None
        if session is not None:
            session.jobs.pop(job.job_id, None)

    def _forget_session(self, session: Session) -> None:
        for job in list(session.jobs.values()):
            self._forget(job)

    def _sweep_unowned(self) -> None:
        deadline = time.time() - self.settings.ttl_s
        for job in list(self.unowned.values()):
            if job.finished and job.finished_at < deadline:
                self._forget(job)


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
