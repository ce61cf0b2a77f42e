"""Long jobs (edits, meshes): submit, queue, progress events, cancel, results.

The Gateway owns the queue, so a job's position and ETA are known: each kind runs at most
``jobs.<kind>.max_running`` jobs at once (the model replicas' total capacity, from the Serve
config), the rest wait in order (``queue``), and beyond ``max_queued`` submissions get 503 +
Retry-After. A running job is one streaming call to its model deployment
(``handle.options(stream=True).<method>.remote(request)``, see
``atelier3d.deployments.streaming``); its progress reports become this job's events
(``runner``). Cancelling cancels that call, and the replica stops at the pipeline's next step.

Jobs belong to a session (their source images came from it) and go with it; jobs without one
(an uploaded image) live ``jobs.ttl_s`` after they finish. Ids are ``secrets`` capabilities.
Submissions carry an optional idempotency key: the same key with the same request returns the
same job; with a different request, 409.

A job runs in the replica that took it. With Redis sessions (``sessions.backend: redis``) its
record, events and results are also in Redis (``store``): the async lookups (``fetch``,
``follow``, ``cancel``, ``fetch_result``, what the HTTP routes use) answer for any job from any
replica; the synchronous ones (``get``, ``result``: the sticky UI's) for this replica's jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from atelier3d.config import JobSettings
from atelier3d.errors import Conflict, NotFound, Unavailable
from atelier3d.metrics import set_jobs
from atelier3d.serve.auth import visible
from atelier3d.serve.fair_use import FairUse
from atelier3d.serve.jobs.queue import KindQueue
from atelier3d.serve.jobs.runner import JobRunner
from atelier3d.serve.jobs.store import build_job_store
from atelier3d.serve.jobs.types import (
    JOB_GONE,
    Artifact,
    Job,
    JobKind,
    Queued,
    TakenOver,
    fingerprint,
)
from atelier3d.serve.sessions import SessionStore
from atelier3d.serve.sessions.session import Session, new_id

logger = logging.getLogger("ray.serve")


class JobService:
    def __init__(self, settings: JobSettings, store: SessionStore,
                 fair_use: FairUse | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fair_use = fair_use
        self.kinds: dict[str, JobKind] = {}
        self.queues: dict[str, KindQueue] = {}
        self.jobs: dict[str, Job] = {}  # the jobs this replica runs (or ran)
        self.keys: dict[tuple[str, str], str] = {}  # (owner, idempotency key) -> job id
        self.unowned: OrderedDict[str, Job] = OrderedDict()  # session-less jobs, oldest first
        store.on_drop.append(self._forget_session)
        self.records = build_job_store(settings, store, self.kinds, self.jobs, self._forget,
                                       self._adopt)
        self.runner = JobRunner(settings, store, self.records)
        self.draining = False

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
        if self.draining:
            raise Unavailable("this Gateway replica is stopping; retry (another one takes it)",
                              retry_after_s=1)
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
            here = sum(1 for j in self.jobs.values() if j.client == client and not j.finished)
            self.fair_use.check_active_jobs(client, await self.records.active_jobs(client, here))
        request = await build()
        self._sweep_unowned()
        if session is not None:
            await self.records.make_room(session)
        job = Job(new_id("job"), kind, session.session_id if session else None, client, digest,
                  request=payload)
        queue = self.queues[kind_name]
        queue.admit(job)
        try:
            taken = await self.records.add(job, session, owner, idempotency_key, request)
            existing = await self._taken(taken) if taken is not None else None
        except BaseException:
            queue.leave(job)
            raise
        if existing is not None:  # another replica took the same key meanwhile
            queue.leave(job)
            if existing.fingerprint != digest:
                raise Conflict("this Idempotency-Key was used for a different request")
            return existing
        self.jobs[job.job_id] = job
        if session is None:
            self.unowned[job.job_id] = job
        if idempotency_key:
            self.keys[(owner, idempotency_key)] = job.job_id
            job.idempotency = (owner, idempotency_key)
        self.runner.start(job, request, queue)
        self._announce_positions()
        self.records.watch()
        logger.info("job %s (%s) queued", job.job_id[:10], kind_name)
        return job

    def _adopt(self, job: Job, request: Any) -> None:
        """Queues here ``job``, taken over (its events so far with it) from a Gateway replica
        that was lost while the job was queued there."""
        queue = self.queues[job.kind.name]
        queue.admit(job, taken_over=True)
        self.jobs[job.job_id] = job
        if job.session_id is None:
            self.unowned[job.job_id] = job
        self.runner.emit(job, TakenOver(reason="the Gateway replica it was queued on was lost; "
                                               "this one queues it now"))
        self.runner.start(job, request, queue)
        self._announce_positions()
        self.records.watch()
        logger.warning("job %s (%s) taken over from a lost Gateway replica", job.job_id[:10],
                       job.kind.name)

    async def _by_key(self, owner: str, key: str) -> Job | None:
        """The job an idempotency key names, if any."""
        existing = self.jobs.get(self.keys.get((owner, key), ""))
        if existing is not None:
            return existing
        found = await self.records.find(owner, key)
        if found is None:
            return None
        try:
            return await self.fetch(found)
        except NotFound:
            return None

    async def _taken(self, job_id: str) -> Job:
        """The job another replica submitted with the same idempotency key."""
        try:
            return await self.fetch(job_id)
        except NotFound:
            raise Conflict("this Idempotency-Key's job has just gone; retry") from None

    # ---- progress ---------------------------------------------------------------------------

    def _announce_positions(self) -> None:
        for name, queue in self.queues.items():
            set_jobs(name, queue.running, len(queue.waiting))
            for position, job in enumerate(queue.waiting):
                if job.queue_position != position and not job.finished:
                    job.queue_position = position
                    self.runner.emit(job, Queued(queue_position=position))

    async def follow(self, job_id: str, after: int = -1) -> AsyncIterator[dict]:
        """The job's events with ``seq > after``, then new ones as they come, until the end."""
        if job_id not in self.jobs:  # another replica's (with Redis sessions)
            async for event in self.records.events(job_id, after):
                yield event
            return
        job = self.get(job_id)
        index = max(0, after + 1)  # never a negative index: that would count from the end
        while True:
            while index < len(job.events):
                yield job.events[index]
                index += 1
            if job.finished:
                return
            await job.next_event(index)

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
            raise NotFound(JOB_GONE)
        self.records.use_session(job)
        return job

    async def fetch(self, job_id: str) -> Job:
        """The job, whichever replica runs it; a use of its session."""
        self._sweep_unowned()
        job = self.jobs.get(job_id)
        if job is None:
            job = await self.records.load(job_id)
        if job is None or not visible(job.client):  # another API key's job: as if not there
            raise NotFound(JOB_GONE)
        await self.records.load_session(job)
        return job

    async def prefetch(self, session: Session, job_ids: list[str]) -> None:
        """Other replicas' jobs that a request names as sources, with their results, into this
        replica's copy of ``session`` (for ``get_in_session``)."""
        await self.records.prefetch(session, job_ids)

    def get_in_session(self, session: Session, job_id: str) -> Job:
        """A job that must belong to ``session`` (as a source of another job)."""
        job = session.jobs.get(job_id)  # None also for another replica's job not prefetched
        if job is None:
            raise NotFound(f"job {job_id!r} not found in this session")
        return job

    async def cancel(self, job_id: str) -> Job:
        job = await self.fetch(job_id)
        if job.finished:
            raise Conflict(f"the job has already {job.status}")
        if job.remote:  # another replica runs it: asks it to, and waits until it has
            return await self.records.cancel(job)
        job.task.cancel()
        await asyncio.wait([job.task])
        return job

    def result(self, job_id: str, artifact: str | None = None) -> Artifact:
        return self._artifact(self.get(job_id), artifact)

    async def fetch_result(self, job_id: str, artifact: str | None = None) -> Artifact:
        """``result`` for any replica's job (its bytes from Redis when another runs it)."""
        job = await self.fetch(job_id)
        found = self._artifact(job, artifact)
        if not job.remote:
            return found
        data = await self.records.data(job_id, artifact)
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

    # ---- stopping ---------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """This replica is being stopped (scale-down, upgrade): no new jobs here; those queued
        or running may finish for ``timeout_s``; any left then fail as retryable (their events
        say so, rather than a replica that just vanishes); everything is written out."""
        self.draining = True
        unfinished = [job.task for job in self.jobs.values()
                      if not job.finished and job.task is not None]
        if unfinished:
            logger.info("stopping: waiting up to %.0f s for %d jobs", timeout_s, len(unfinished))
            _, late = await asyncio.wait(unfinished, timeout=timeout_s)
            for job in [j for j in self.jobs.values() if j.task in late and not j.finished]:
                self.runner.stop(job, timeout_s)
            if late:
                await asyncio.wait(late)
        await self.records.flush()

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
        self.records.forget(job.job_id)

    def _forget_session(self, session: Session) -> None:
        """The jobs of a session that has gone, which run here (with Redis sessions, their
        records went with it)."""
        for job in [j for j in self.jobs.values() if j.session_id == session.session_id]:
            self._forget(job)

    def _sweep_unowned(self) -> None:
        deadline = time.time() - self.settings.ttl_s
        for job in list(self.unowned.values()):
            if job.finished and job.finished_at < deadline:
                self._forget(job)
