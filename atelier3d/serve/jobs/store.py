"""Where jobs are kept besides the replica that runs them: one interface, two backends.

A job always runs in the Gateway replica that took its submission (its queue slot, its streaming
call to the model and its task live there, in ``JobService``). ``JobStore`` is what else there
is: with memory sessions (``memory.MemoryJobStore``) nothing, since every request of a session
comes to this replica; with Redis sessions (``redis_store.RedisJobStore``) the job's record,
events and results in Redis, so that any replica answers ``fetch``, ``follow``, ``cancel`` and
``fetch_result`` for any job. The backend follows the session store's, chosen once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from atelier3d.config import JobSettings
from atelier3d.serve.jobs.memory import MemoryJobStore
from atelier3d.serve.jobs.redis_store import RedisJobStore
from atelier3d.serve.jobs.types import Job, JobKind
from atelier3d.serve.sessions import SessionStore
from atelier3d.serve.sessions.redis_store import RedisSessionStore
from atelier3d.serve.sessions.session import Session


class JobStore(Protocol):
    # ---- this replica's jobs, as they happen ----------------------------------------------------

    async def add(self, job: Job, session: Session | None, owner: str,
                  key: str | None, request: Any) -> str | None:
        """Keeps a new job: in its session's jobs, with its idempotency key and, while it is
        queued, its deployment's ``request`` (so another replica can take it over). Returns the
        id of the job ``key`` names already (another replica took it meanwhile), and then keeps
        nothing of this one."""
        ...

    async def make_room(self, session: Session) -> None:
        """Forgets ``session``'s oldest finished jobs until one more fits
        (``jobs.max_jobs_per_session``); 429 when none of them has finished."""
        ...

    def publish(self, job: Job) -> None:
        """The job has a new event (in ``job.events``)."""
        ...

    async def flush(self) -> None:
        """Waits until everything published so far is kept."""
        ...

    def watch(self) -> None:
        """A job was submitted here: while this replica runs jobs, act on what other replicas
        do to them (cancel them, delete their session)."""
        ...

    def forget(self, job_id: str) -> None:
        """This replica lets go of one of its jobs."""
        ...

    # ---- any replica's jobs ---------------------------------------------------------------------

    async def active_jobs(self, client: str, here: int) -> int:
        """``client``'s queued and running jobs, all replicas together (``here``: this
        replica's), for ``fair_use.max_active_jobs``."""
        ...

    async def find(self, owner: str, key: str) -> str | None:
        """The id of the job another replica took with this idempotency key, if any."""
        ...

    async def load(self, job_id: str) -> Job | None:
        """A job another replica runs, as its record shows it (``remote``; bytes not read)."""
        ...

    def events(self, job_id: str, after: int) -> AsyncIterator[dict]:
        """Another replica's job's events with ``seq > after``, until its last one."""
        ...

    async def cancel(self, job: Job) -> Job:
        """Cancels another replica's job (``remote``) and returns it as it ended."""
        ...

    async def data(self, job_id: str, artifact: str | None) -> bytes | None:
        """Another replica's job's result (or ``artifact``) bytes; None when gone."""
        ...

    async def prefetch(self, session: Session, job_ids: list[str]) -> None:
        """Other replicas' jobs among ``job_ids`` (sources of a new job), with their results,
        into this replica's copy of ``session``."""
        ...

    def use_session(self, job: Job) -> None:
        """A synchronous look at this replica's job counts as a use of its session."""
        ...

    async def load_session(self, job: Job) -> None:
        """A look at any job counts as a use of its session; 404 if the session has gone."""
        ...


def build_job_store(settings: JobSettings, sessions: SessionStore, kinds: Mapping[str, JobKind],
                    local: Mapping[str, Job], forget: Callable[[Job], None],
                    adopt: Callable[[Job, Any], None]) -> JobStore:
    """The job store that goes with ``sessions``. ``kinds`` and ``local`` (the jobs this replica
    runs) are the service's, read as they change; ``forget`` lets go of one of them; ``adopt``
    queues here a job (and its request) taken over from a lost replica."""
    if isinstance(sessions, RedisSessionStore):
        return RedisJobStore(settings, sessions, kinds, local, forget, adopt)
    return MemoryJobStore(settings, sessions, forget)
