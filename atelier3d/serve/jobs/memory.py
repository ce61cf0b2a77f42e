"""Jobs with memory sessions: every request of a session comes to this replica, which holds its
jobs (in ``Session.jobs``) and nothing else; there are no other replicas' jobs to read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from atelier3d.config import JobSettings
from atelier3d.errors import NotFound, TooManyRequests
from atelier3d.serve.jobs.types import JOB_GONE, Job
from atelier3d.serve.sessions import SessionStore
from atelier3d.serve.sessions.session import Session


class MemoryJobStore:
    def __init__(self, settings: JobSettings, sessions: SessionStore,
                 forget: Callable[[Job], None]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._forget = forget

    # ---- this replica's jobs ------------------------------------------------------------------

    async def add(self, job: Job, session: Session | None, owner: str,
                  key: str | None, request: Any) -> str | None:
        if session is not None:
            session.jobs[job.job_id] = job
        return None  # the service's own keys are all there is

    async def make_room(self, session: Session) -> None:
        while len(session.jobs) >= self.settings.max_jobs_per_session:
            oldest = next((j for j in session.jobs.values() if j.finished), None)
            if oldest is None:
                raise TooManyRequests(
                    f"this session has {len(session.jobs)} unfinished jobs; wait or cancel one")
            self._forget(oldest)

    def publish(self, job: Job) -> None:
        pass  # its followers read ``job.events``

    async def flush(self) -> None:
        pass

    def watch(self) -> None:
        pass  # nobody else cancels this replica's jobs or deletes its sessions

    def forget(self, job_id: str) -> None:
        pass

    # ---- other replicas' jobs: none -------------------------------------------------------------

    async def active_jobs(self, client: str, here: int) -> int:
        return here  # every job of this replica's clients runs here

    async def find(self, owner: str, key: str) -> str | None:
        return None

    async def load(self, job_id: str) -> Job | None:
        return None

    def events(self, job_id: str, after: int) -> AsyncIterator[dict]:
        raise NotFound(JOB_GONE)

    async def cancel(self, job: Job) -> Job:
        raise NotFound(JOB_GONE)

    async def data(self, job_id: str, artifact: str | None) -> bytes | None:
        return None

    async def prefetch(self, session: Session, job_ids: list[str]) -> None:
        pass  # the session's jobs are all here

    def use_session(self, job: Job) -> None:
        if job.session_id is not None:
            self.sessions.get(job.session_id)  # keeps the session alive while its jobs are used

    async def load_session(self, job: Job) -> None:
        self.use_session(job)
