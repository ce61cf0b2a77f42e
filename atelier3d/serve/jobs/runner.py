"""Running one job in this replica: wait for its queue slot, make its streaming call to the
model, turn what the model reports into the job's progress and events, run it again where its
replica was lost (``jobs.max_attempts`` in all), and finish it: succeeded, failed or cancelled.

Cancelling the job's task cancels the call: Serve's response generator cancels the replica's
request, which stops at the pipeline's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from atelier3d.api.jobs import JobStatus
from atelier3d.config import JobSettings
from atelier3d.errors import ApiError
from atelier3d.metrics import observe_stage
from atelier3d.serve.faults import REPLICA_LOST, describe
from atelier3d.serve.jobs.queue import KindQueue
from atelier3d.serve.jobs.store import JobStore
from atelier3d.serve.jobs.types import (
    Artifact,
    ArtifactReady,
    Finished,
    Job,
    JobEvent,
    Progress,
    Retrying,
    Started,
)
from atelier3d.serve.sessions import SessionStore

logger = logging.getLogger("ray.serve")


class JobRunner:
    def __init__(self, settings: JobSettings, sessions: SessionStore, records: JobStore) -> None:
        self.settings = settings
        self.sessions = sessions
        self.records = records

    def start(self, job: Job, request: Any, queue: KindQueue) -> None:
        """Runs ``job`` (its deployment's ``request``) in a task of its own, ``job.task``."""
        job.task = asyncio.create_task(self._run(job, request, queue))
        job.task.add_done_callback(lambda _: self._settle(job, queue))

    def stop(self, job: Job, waited_s: float) -> None:
        """This replica is stopping and ``job`` is not done: it fails as retryable."""
        job.stopped_error = {
            "code": "gateway_stopped", "retryable": True,
            "message": f"the Gateway replica running this job was stopped (scale-down or "
                       f"upgrade) and the job did not finish in {waited_s:.0f} s; submit it "
                       f"again"}
        if job.task is not None:
            job.task.cancel()

    def emit(self, job: Job, event: JobEvent) -> None:
        """Adds ``event`` to the job's stream (its followers here, and the job store)."""
        job.record(event)
        self.records.publish(job)

    async def _run(self, job: Job, request: Any, queue: KindQueue) -> None:
        keeper = (asyncio.create_task(self._keep_session(job.session_id))
                  if job.session_id is not None else None)
        try:
            await self._queue_and_run(job, request, queue)
        finally:
            if keeper is not None:
                keeper.cancel()

    async def _keep_session(self, session_id: str) -> None:
        """A session is in use while one of its jobs waits or runs (nobody need click meanwhile):
        it must not expire under the job, taking the job with it."""
        while True:
            await asyncio.sleep(self.sessions.ttl_s / 3)
            with contextlib.suppress(ApiError):  # gone already, or Redis briefly away
                await self.sessions.load(session_id)

    async def _queue_and_run(self, job: Job, request: Any, queue: KindQueue) -> None:
        try:
            await queue.acquire(job)
        except asyncio.CancelledError:
            self._finish(job, "cancelled")
            return
        job.status, job.started_at, job.queue_position = "running", time.time(), None
        job.last_report = time.perf_counter()
        job.stage_weights = job.kind.weights()  # fixed for the run: its bar never jumps back
        self.emit(job, Started())
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
                job.stage_done.clear()
                job.artifacts.clear()
                job.last_report = time.perf_counter()
                self.emit(job, Retrying(attempt=attempt + 1, reason=reason))
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
            kind.measured(job.stage_ms)
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

    def _settle(self, job: Job, queue: KindQueue) -> None:
        """A task cancelled before it ever ran skips ``_run``'s handlers: finish it here."""
        if not job.finished:
            queue.leave(job)
            self._finish(job, "cancelled")

    def _on_event(self, job: Job, event: dict) -> None:
        """One event of the model's stream (``atelier3d.deployments.streaming``)."""
        kind = event.get("type")
        if kind == "progress":
            stage, step, total = str(event["stage"]), int(event["step"]), int(event["total"])
            # A report comes when a step ends: the time since the previous one was this stage's.
            now = time.perf_counter()
            job.stage_ms[stage] = job.stage_ms.get(stage, 0.0) + (now - job.last_report) * 1000
            observe_stage(f"{job.kind.name}_{stage}", (now - job.last_report) * 1000)
            job.last_report = now
            job.stage, job.step, job.total = stage, step, total
            # From each stage's latest report, not from stage order: a layered mesh goes
            # through conditioning and denoising once per part, alternating.
            job.stage_done[stage] = min(1.0, step / max(total, 1))
            weights = job.stage_weights or job.kind.weights()
            done = sum(weights.get(name, 0.0) * part for name, part in job.stage_done.items())
            job.progress = max(job.progress, min(1.0, done))
            self.emit(job, Progress(stage=stage, step=step, total=total, part=event.get("part"),
                                    parts=event.get("parts")))
        elif kind == "artifact":
            name = str(event["name"])
            job.artifacts[name] = Artifact(event["media_type"], event["data"], event["meta"])
            self.emit(job, ArtifactReady(name=name, media_type=event["media_type"],
                                         meta=event["meta"]))
        elif kind == "result":
            job.result = Artifact(event["media_type"], event["data"], event["meta"])

    def _finish(self, job: Job, status: JobStatus, error: dict | None = None) -> None:
        if status == "cancelled" and job.stopped_error is not None:  # by ``stop``, not a user
            status, error = "failed", job.stopped_error
        job.status, job.error, job.finished_at = status, error, time.time()
        job.queue_position = None
        if status == "succeeded":
            job.progress = 1.0
        self.emit(job, Finished(status=status, error=error))
        logger.info("job %s %s", job.job_id[:10], status)
