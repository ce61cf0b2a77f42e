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

With Redis sessions (``sessions.backend: redis``) a job still runs in the replica that took it,
which also writes its record, events and results to Redis (``redis_mirror``): the
async lookups (``fetch``, ``follow``, ``cancel``, ``fetch_result``, what the HTTP routes use)
answer for any job from any replica; the synchronous ones (``get``, ``result``: the sticky UI's)
for this replica's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from atelier3d.api.common import ErrorBody
from atelier3d.api.jobs import JobArtifact, JobState
from atelier3d.config import JobKindSettings, JobSettings
from atelier3d.errors import ApiError, Conflict, NotFound, TooManyRequests, Unavailable
from atelier3d.metrics import observe_stage, set_jobs
from atelier3d.serve.auth import visible
from atelier3d.serve.fair_use import FairUse
from atelier3d.serve.faults import REPLICA_LOST, describe
from atelier3d.serve.jobs.redis_mirror import POLL_S, WATCH_S, JobMirror
from atelier3d.serve.sessions import SessionStore
from atelier3d.serve.sessions.session import Session, new_id

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
    remote: bool = False  # a view of a job another replica runs (from its Redis record)
    recorded_eta: float | None = None  # a remote job's ETA, as of its last event
    events_sent: int = 0  # events written to Redis so far
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _last_report: float = 0.0  # perf_counter of the last progress report (or the start)
    _stage_done: dict[str, float] = field(default_factory=dict)  # stage -> fraction done

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
    def __init__(self, settings: JobSettings, store: SessionStore,
                 fair_use: FairUse | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fair_use = fair_use
        self.kinds: dict[str, JobKind] = {}
        self.queues: dict[str, KindQueue] = {}
        self.jobs: dict[str, Job] = {}
        self.keys: dict[tuple[str, str], str] = {}  # (owner, idempotency key) -> job id
        self.unowned: OrderedDict[str, Job] = OrderedDict()  # session-less jobs, oldest first
        store.on_drop.append(self._forget_session)
        self.mirror = None  # job records in Redis, with Redis sessions
        self._watcher: asyncio.Task | None = None
        if getattr(store, "backend", "memory") == "redis":
            self.mirror = JobMirror(store, settings)
            store.job_lookup = self.jobs.get

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
            existing = await self._by_key(owner, idempotency_key)
            if existing is not None:
                if existing.fingerprint != digest:
                    raise Conflict("this Idempotency-Key was used for a different request")
                return existing
        if self.fair_use is not None:
            active = sum(1 for j in self.jobs.values() if j.client == client and not j.finished)
            self.fair_use.check_active_jobs(client, active)
        request = await build()
        self._sweep_unowned()
        if session is not None:
            if self.mirror is not None:
                await self._make_room_shared(session)
            else:
                self._make_room(session)
        job = Job(new_id("job"), kind, session.session_id if session else None, client, digest)
        self.queues[kind_name].admit(job)
        if self.mirror is not None:
            try:
                existing = await self._share(job, session, owner, idempotency_key)
            except BaseException:
                self.queues[kind_name].leave(job)
                raise
            if existing is not None:  # another replica took the same key meanwhile
                self.queues[kind_name].leave(job)
                if existing.fingerprint != digest:
                    raise Conflict("this Idempotency-Key was used for a different request")
                return existing
        self.jobs[job.job_id] = job
        if session is not None:
            if self.mirror is None:
                session.jobs[job.job_id] = job
        else:
            self.unowned[job.job_id] = job
        if idempotency_key:
            self.keys[(owner, idempotency_key)] = job.job_id
            job.idempotency = (owner, idempotency_key)
        job.task = asyncio.create_task(self._run(job, request))
        job.task.add_done_callback(lambda _: self._settle(job))
        self._announce_positions()
        if self.mirror is not None:
            self._watch_soon()
        logger.info("job %s (%s) queued", job.job_id[:10], kind_name)
        return job

    async def _by_key(self, owner: str, key: str) -> Job | None:
        """The job an idempotency key names, if any."""
        existing = self.jobs.get(self.keys.get((owner, key), ""))
        if existing is not None or self.mirror is None:
            return existing
        found = await self.mirror.find(owner, key)
        if found is None:
            return None
        try:
            return await self.fetch(found[0])
        except NotFound:
            return None

    async def _share(self, job: Job, session: Session | None, owner: str,
                     key: str | None) -> Job | None:
        """Writes a new job's record, claims its idempotency key and lists it in its session's
        record (Redis). Returns the job the key named already, if another replica got there
        first (and then leaves nothing of this one behind)."""
        await self.mirror.create(job)
        if key:
            found = await self.mirror.claim(owner, key, job)
            if found is not None:
                await self.mirror.delete(job.job_id, job.session_id)
                try:
                    return await self.fetch(found[0])
                except NotFound:
                    raise Conflict("this Idempotency-Key's job has just gone; retry") from None
        if session is not None:
            try:
                await self.store.update(session.session_id,
                                        lambda s: s.jobs.__setitem__(job.job_id, job))
            except BaseException:
                await self.mirror.delete(job.job_id, job.session_id)
                raise
        return None

    async def _make_room_shared(self, session: Session) -> None:
        """``_make_room`` for Redis sessions, whose jobs may run in other replicas."""
        while len(session.jobs) >= self.settings.max_jobs_per_session:
            ids = list(session.jobs)
            statuses = await self.mirror.statuses(ids)
            oldest = next((j for j in ids if statuses[j] is None or statuses[j] in FINISHED),
                          None)
            if oldest is None:
                raise TooManyRequests(
                    f"this session has {len(session.jobs)} unfinished jobs; wait or cancel one")
            local = self.jobs.get(oldest)
            if local is not None:
                self._forget(local)
            await self.mirror.delete(oldest, session.session_id)
            await self.store.update(session.session_id,
                                    lambda s, gone=oldest: s.jobs.pop(gone, None))

    def _make_room(self, session: Session) -> None:
        while len(session.jobs) >= self.settings.max_jobs_per_session:
            oldest = next((j for j in session.jobs.values() if j.finished), None)
            if oldest is None:
                raise TooManyRequests(
                    f"this session has {len(session.jobs)} unfinished jobs; wait or cancel one")
            self._forget(oldest)

    # ---- run ------------------------------------------------------------------------------

    async def _run(self, job: Job, request: Any) -> None:
        keeper = (asyncio.create_task(self._keep_session(job.session_id))
                  if job.session_id is not None else None)
        try:
            await self._queue_and_run(job, request)
        finally:
            if keeper is not None:
                keeper.cancel()

    async def _keep_session(self, session_id: str) -> None:
        """A session is in use while one of its jobs waits or runs (nobody need click meanwhile):
        it must not expire under the job, taking the job with it."""
        while True:
            await asyncio.sleep(self.store.ttl_s / 3)
            with contextlib.suppress(ApiError):  # gone already, or Redis briefly away
                await self.store.load(session_id)

    async def _queue_and_run(self, job: Job, request: Any) -> None:
        queue = self.queues[job.kind.name]
        try:
            await queue.acquire(job)
        except asyncio.CancelledError:
            self._finish(job, "cancelled")
            return
        job.status, job.started_at, job.queue_position = "running", time.time(), None
        job._last_report = time.perf_counter()
        self._emit(job, {"type": "started"})
        try:
            await self._attempts(job, request)
        finally:
            queue.release()

    async def _attempts(self, job: Job, request: Any) -> None:
        """Runs the job; where its replica is lost, runs it again (``max_attempts`` in all)."""
        kind = job.kind
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                await self._attempt(job, request)
                return
            except REPLICA_LOST as exc:
                reason = describe(exc)
                logger.warning("job %s: replica lost (%s), attempt %d of %d", job.job_id[:10],
                               reason, attempt, self.settings.max_attempts)
            if attempt < self.settings.max_attempts:  # from the start, on a live replica
                job.progress, job.stage, job.step, job.total = 0.0, None, 0, 0
                job._stage_done.clear()
                job.artifacts.clear()
                job._last_report = time.perf_counter()
                self._emit(job, {"type": "retrying", "attempt": attempt + 1, "reason": reason})
        self._finish(job, "failed", {
            "code": "replica_lost", "retryable": True,
            "message": f"the {kind.name} replica was lost {self.settings.max_attempts} times "
                       f"({reason}); submit the job again"})

    async def _attempt(self, job: Job, request: Any) -> None:
        """One run on a replica; finishes the job unless the replica was lost (raised)."""
        kind = job.kind
        stream = None
        try:
            stream = kind.start(request)
            async for event in stream:
                self._on_event(job, event)
            kind.mean_seconds = 0.7 * kind.mean_seconds + 0.3 * (time.time() - job.started_at)
            self._finish(job, "succeeded")
        except REPLICA_LOST:
            raise
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
        if self.mirror is not None:
            self.mirror.publish(job)

    def _announce_positions(self) -> None:
        for name, queue in self.queues.items():
            set_jobs(name, queue.running, len(queue.waiting))
            for position, job in enumerate(queue.waiting):
                if job.queue_position != position and not job.finished:
                    job.queue_position = position
                    self._emit(job, {"type": "queued", "queue_position": position})

    async def follow(self, job_id: str, after: int = -1) -> AsyncIterator[dict]:
        """The job's events with ``seq > after``, then new ones as they come, until the end."""
        if self.mirror is not None and job_id not in self.jobs:
            async for event in self._follow_shared(job_id, after):
                yield event
            return
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

    async def _follow_shared(self, job_id: str, after: int) -> AsyncIterator[dict]:
        """Another replica's job: its events from Redis, polled until the last one."""
        index = after + 1
        while True:
            events, exists = await self.mirror.events(job_id, index)
            for event in events:
                yield event
                index += 1
                if event["type"] in FINISHED:
                    return
            if not exists:
                return
            if not events:
                await asyncio.sleep(POLL_S)

    async def wait(self, job_id: str) -> Job:
        async for _ in self.follow(job_id):
            pass
        return await self.fetch(job_id)

    # ---- lookup, cancel, results ------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """A job of this replica (with Redis sessions, ``fetch`` finds any replica's)."""
        self._sweep_unowned()
        job = self.jobs.get(job_id)
        if job is None or not visible(job.client):  # another API key's job: as if not there
            raise NotFound("job not found (its session may have expired)")
        if job.session_id is not None and self.mirror is None:
            self.store.get(job.session_id)  # keeps the session alive while its jobs are used
        return job

    async def fetch(self, job_id: str) -> Job:
        """The job, whichever replica runs it; a use of its session."""
        if self.mirror is None:
            return self.get(job_id)
        self._sweep_unowned()
        job = self.jobs.get(job_id)
        if job is None:
            state = await self.mirror.load(job_id)
            if state is None or state["kind"] not in self.kinds:
                raise NotFound("job not found (its session may have expired)")
            job = self._view(job_id, state)
        if not visible(job.client):  # another API key's job: as if not there
            raise NotFound("job not found (its session may have expired)")
        if job.session_id is not None:
            try:
                await self.store.load(job.session_id)  # keeps the session alive
            except NotFound:
                raise NotFound("job not found (its session may have expired)") from None
        return job

    def _view(self, job_id: str, state: dict) -> Job:
        """A job another replica runs, as its record describes it (bytes not read)."""
        job = Job(job_id, self.kinds[state["kind"]], state["session_id"], state["client"],
                  state["fingerprint"], created_at=state["created_at"], status=state["status"],
                  stage=state["stage"], step=state["step"], total=state["total"],
                  progress=state["progress"], queue_position=state["queue_position"],
                  started_at=state["started_at"], finished_at=state["finished_at"],
                  error=state["error"], stage_ms=state["stage_ms"], remote=True,
                  recorded_eta=state["eta_s"])
        job.artifacts = {name: Artifact(a["media_type"], b"", a["meta"])
                         for name, a in state["artifacts"].items()}
        if state["result"] is not None:
            job.result = Artifact(state["result"]["media_type"], b"", state["result"]["meta"])
        return job

    async def prefetch(self, session: Session, job_ids: list[str]) -> None:
        """Other replicas' jobs that a request names as sources, with their results, into this
        replica's copy of ``session`` (for ``get_in_session``). Nothing to do in memory."""
        if self.mirror is None:
            return
        for job_id in job_ids:
            if job_id not in session.jobs or session.jobs[job_id] is not None:
                continue
            state = await self.mirror.load(job_id)
            if state is None or state["kind"] not in self.kinds:
                continue
            view = self._view(job_id, state)
            if view.result is not None:
                view.result.data = await self.mirror.data(job_id, None) or b""
            session.jobs[job_id] = view

    def get_in_session(self, session: Session, job_id: str) -> Job:
        """A job that must belong to ``session`` (as a source of another job)."""
        job = session.jobs.get(job_id)  # None also for another replica's job not prefetched
        if job is None:
            raise NotFound(f"job {job_id!r} not found in this session")
        return job

    async def cancel(self, job_id: str) -> Job:
        if self.mirror is not None and job_id not in self.jobs:
            return await self._cancel_shared(job_id)
        job = await self.fetch(job_id)
        if job.finished:
            raise Conflict(f"the job has already {job.status}")
        job.task.cancel()
        await asyncio.wait([job.task])
        return job

    async def _cancel_shared(self, job_id: str, timeout_s: float = 30.0) -> Job:
        """Another replica's job: asks it to cancel, and waits until it says it has."""
        job = await self.fetch(job_id)
        if job.finished:
            raise Conflict(f"the job has already {job.status}")
        await self.mirror.request_cancel(job_id)
        deadline = time.monotonic() + timeout_s
        while not job.finished and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            state = await self.mirror.load(job_id)
            if state is None:
                raise NotFound("job not found (its session may have expired)")
            job = self._view(job_id, state)
        return job

    def _watch_soon(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """While this replica runs jobs: cancels those another replica cancelled, and those
        whose records went (their session was deleted elsewhere, or expired)."""
        while True:
            running = [job.job_id for job in self.jobs.values() if not job.finished]
            if not running:
                return
            await asyncio.sleep(WATCH_S)
            try:
                cancel, gone = await self.mirror.watch(running)
            except Exception:  # noqa: BLE001 - Redis unreachable for a moment: try again
                logger.exception("watching jobs in Redis failed")
                continue
            for job_id in cancel:
                job = self.jobs.get(job_id)
                if job is not None and not job.finished and job.task is not None:
                    job.task.cancel()
            for job_id in gone:
                job = self.jobs.get(job_id)
                if job is not None:
                    logger.info("job %s: its record went (session ended): cancelled",
                                job_id[:10])
                    self._forget(job)

    def result(self, job_id: str, artifact: str | None = None) -> Artifact:
        return self._artifact(self.get(job_id), artifact)

    async def fetch_result(self, job_id: str, artifact: str | None = None) -> Artifact:
        """``result`` for any replica's job (its bytes from Redis when another runs it)."""
        job = await self.fetch(job_id)
        found = self._artifact(job, artifact)
        if not job.remote:
            return found
        data = await self.mirror.data(job_id, artifact)
        if data is None:
            raise NotFound("the job's result has gone (its session may have expired)")
        return Artifact(found.media_type, data, found.meta)

    def _artifact(self, job: Job, artifact: str | None) -> Artifact:
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
        if self.mirror is not None:
            self.mirror.forget(job.job_id)

    def _forget_session(self, session: Session) -> None:
        if self.mirror is not None:  # its jobs that run here (its records went with it)
            for job in [j for j in self.jobs.values() if j.session_id == session.session_id]:
                self._forget(job)
            return
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
