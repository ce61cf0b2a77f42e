"""Jobs with Redis sessions (``sessions.backend: redis``): any Gateway replica answers a job's
status, events and results; the replica that took the submission runs it.

A job runs where it was submitted: its queue slot, its streaming call to the model and its
asyncio task live in that replica (``JobService``), which writes what happens to Redis as it
happens, in order, from one writer task:

- ``P:job:<id>``: hash ``state`` (JSON: what ``GET /v1/jobs/<id>`` shows, the ETA as of the last
  event), ``cancel`` (set by another replica's ``DELETE``), ``idem`` (its idempotency key's name);
- ``P:job:<id>:events``: list of the events (JSON), the NDJSON/SSE stream's ``seq`` = index;
- ``P:job:<id>:artifact:<name>``, ``P:job:<id>:result``: the bytes;
- ``P:idem:<sha256(owner, key)>``: ``<job id> <fingerprint>`` (``SET NX``: one job per key across
  replicas);
- ``P:active:<sha256(client)>``: set of the client's unfinished jobs, for
  ``fair_use.max_active_jobs`` across replicas (a job leaves it when it finishes; one found
  finished or gone when counting is dropped then).

A session's jobs are listed in its record and their keys in the session's key set, so they live
and go with it (TTL refreshed by each use of the session); a job without a session lives
``jobs.ttl_s`` from its last event. Another replica follows a job by reading its event list
and waiting on the channel ``P:job:<id>:events`` (pub/sub), on which the writer publishes as it
appends: an event reaches another replica's follower in about a Redis round trip, not a poll
interval. It cancels a job by setting ``cancel`` and publishing the id on ``P:job-cancels``,
which the running replica's watcher is subscribed to while it runs jobs. ``POLL_S`` and
``WATCH_S`` remain only as a fallback (a message lost with a dropped connection). The watcher
also cancels jobs whose records went (their session was deleted elsewhere, or expired). Queue
positions and ETAs are the running replica's (each replica has its own queue,
``jobs.<kind>.max_running`` each).

A replica that dies (killed, its pod removed) takes its jobs' tasks with it. So that they do not
stay ``queued``/``running`` forever, each unfinished job has a lease, ``P:job:<id>:lease``
(``jobs.lease_s``; its value and the hash's ``owner`` name the replica that runs it), which its
replica's watcher renews. While a job is queued, its deployment's request is kept too,
``P:job:<id>:request`` (``requests.py``: JSON and arrays, nothing that runs code). Whoever looks
at a job whose lease has lapsed (a follower, a status read, a cancel):

- takes a queued job over: claims its lease and ``owner`` (a compare-and-set in one script, so
  one replica wins), queues it in its own queue with a ``taken_over`` event, and runs it there;
- finishes a running one (or a queued one whose request is gone) in Redis: status ``failed``,
  error ``gateway_lost`` with ``retryable: true``, and that last event, once (a compare-and-set
  on its state); the record is marked ``lost``. A running job's model call died with its
  replica and what it streamed is not replayed: the client submits it again.

A replica that was only stalled, not dead, finds its job ``lost`` or owned by another replica,
stops writing to it and lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from atelier3d.config import JobSettings
from atelier3d.errors import NotFound, TooManyRequests
from atelier3d.serve.jobs.requests import decode_request, encode_request
from atelier3d.serve.jobs.types import FINISHED, JOB_GONE, Artifact, Job, JobKind
from atelier3d.serve.sessions.redis_store import RedisSessionStore
from atelier3d.serve.sessions.session import Session

logger = logging.getLogger("ray.serve")

# Fallbacks: events and cancels are published; these bound the wait should a message be lost.
WATCH_S = 1.0  # how often a replica looks for cancellations of the jobs it runs anyway
POLL_S = 1.0  # how often a follower on another replica reads the event list anyway

# ARGV: hash, events, ttl_ms, state, session key set ('' if none), owner, n events, events...,
#       m records, m x (key, value) -> 0 if the job's record is gone, lost or another replica's
#       (nothing written), else 1
_WRITE = """
local hash, events, ttl, skeys = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5]
if redis.call('EXISTS', hash) == 0 then return 0 end
if redis.call('HEXISTS', hash, 'lost') == 1 then return 0 end
local owner = redis.call('HGET', hash, 'owner')
if owner and owner ~= ARGV[6] then return 0 end
redis.call('HSET', hash, 'state', ARGV[4])
local n = tonumber(ARGV[7])
local i = 8
for _ = 1, n do
  redis.call('RPUSH', events, ARGV[i])
  i = i + 1
end
if n > 0 then redis.call('PUBLISH', events, n) end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('SET', ARGV[i], ARGV[i + 1], 'PX', ttl)
  if skeys ~= '' then redis.call('SADD', skeys, ARGV[i]) end
  i = i + 2
end
redis.call('PEXPIRE', hash, ttl)
redis.call('PEXPIRE', events, ttl)
return 1
"""

# ARGV: hash, events, lease, state as read, events as counted, failed state, failed event
# -> 1 when the job was finished as lost; 0 when its lease is back or its record changed
_LOST = """
local hash, events, lease = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', lease) == 1 then return 0 end
if redis.call('HGET', hash, 'state') ~= ARGV[4] then return 0 end
if redis.call('LLEN', events) ~= tonumber(ARGV[5]) then return 0 end
redis.call('RPUSH', events, ARGV[7])
redis.call('HSET', hash, 'state', ARGV[6], 'lost', '1')
redis.call('PUBLISH', events, 1)
return 1
"""

# ARGV: hash, lease, request, owner, lease_ms -> the request (this replica owns the job now),
# or nil: the lease is back, the job is lost, not queued any more, or its request is gone
_TAKE_OVER = """
local hash, lease, request = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', lease) == 1 then return false end
if redis.call('HEXISTS', hash, 'lost') == 1 then return false end
local state = redis.call('HGET', hash, 'state')
if not state or cjson.decode(state).status ~= 'queued' then return false end
local body = redis.call('GET', request)
if not body then return false end
redis.call('SET', lease, ARGV[4], 'PX', ARGV[5])
redis.call('HSET', hash, 'owner', ARGV[4])
return body
"""

RESULT = "result"
REQUEST = "request"
GATEWAY_LOST = {
    "code": "gateway_lost", "retryable": True,
    "message": "the Gateway replica running this job stopped before it finished (its lease "
               "lapsed); submit the job again"}


def record(job: Job) -> dict:
    """What another replica needs to show the job (``job_state``) and check a request on it."""
    eta = job.eta_s()
    return {
        "kind": job.kind.name, "session_id": job.session_id, "client": job.client,
        "fingerprint": job.fingerprint, "created_at": job.created_at, "status": job.status,
        "stage": job.stage, "step": job.step, "total": job.total, "progress": job.progress,
        "queue_position": job.queue_position, "started_at": job.started_at,
        "finished_at": job.finished_at, "error": job.error, "eta_s": eta,
        "request": job.request,
        "artifacts": {name: {"media_type": a.media_type, "meta": a.meta}
                      for name, a in job.artifacts.items()},
        "result": ({"media_type": job.result.media_type, "meta": job.result.meta}
                   if job.result is not None else None),
        "stage_ms": job.stage_ms,
    }


def _cancelling() -> bool:
    """Whether this task is being cancelled (redis-py may turn that into another error while
    a command is in flight: a loop that retries on errors must not swallow it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class RedisJobStore:
    """``JobStore`` in Redis. ``kinds`` and ``local`` (this replica's jobs) are the service's;
    ``forget`` lets go of one of them, ``adopt`` queues one taken over from a lost replica."""

    def __init__(self, settings: JobSettings, sessions: RedisSessionStore,
                 kinds: Mapping[str, JobKind], local: Mapping[str, Job],
                 forget: Callable[[Job], None], adopt: Callable[[Job, Any], None]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.kinds = kinds
        self.local = local
        self._forget = forget
        self._adopt = adopt
        self.owner = secrets.token_hex(8)  # this replica, as the lease and ``owner`` name it
        self.redis = sessions.redis
        self.prefix = sessions.prefix
        self._script = self.redis.register_script(_WRITE)
        self._lost = self.redis.register_script(_LOST)
        self._claim_queued = self.redis.register_script(_TAKE_OVER)
        self.lease_ms = max(1, int(settings.lease_s * 1000))
        self.cancels_channel = f"{self.prefix}:job-cancels"
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._written: dict[str, set[str]] = {}  # job id -> its records written (artifacts, result)
        sessions.job_lookup = local.get  # a session's job ids map to the jobs running here

    # ---- keys ---------------------------------------------------------------------------------

    def key(self, job_id: str, *rest: str) -> str:
        return ":".join([f"{self.prefix}:job:{job_id}", *rest])

    def idem_key(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    def active_key(self, client: str) -> str:
        return f"{self.prefix}:active:{hashlib.sha256(client.encode()).hexdigest()[:32]}"

    def ttl_ms(self, session_id: str | None) -> int:
        return self.sessions.ttl_ms if session_id else max(1, int(self.settings.ttl_s * 1000))

    def _session_keys(self, session_id: str | None) -> str:
        return self.sessions.key(session_id, "keys") if session_id else ""

    # ---- the running replica's side -----------------------------------------------------------

    async def add(self, job: Job, session: Session | None, owner: str,
                  key: str | None, request: Any) -> str | None:
        """Writes a new job's record and its request, claims its idempotency key and lists it
        in its session's record. Where another replica got the key first, leaves nothing of
        this job behind."""
        await self._create(job, encode_request(request))
        if key:
            found = await self._claim(owner, key, job)
            if found is not None:
                await self._delete(job.job_id, job.session_id)
                return found
        if session is not None:
            try:
                await self.sessions.update(session.session_id,
                                           lambda s: s.jobs.__setitem__(job.job_id, job))
            except BaseException:
                await self._delete(job.job_id, job.session_id)
                raise
        return None

    async def make_room(self, session: Session) -> None:
        """The session's jobs may run in other replicas: their statuses come from Redis."""
        while len(session.jobs) >= self.settings.max_jobs_per_session:
            ids = list(session.jobs)
            statuses = await self._statuses(ids)
            oldest = next((j for j in ids if statuses[j] is None or statuses[j] in FINISHED),
                          None)
            if oldest is None:
                raise TooManyRequests(
                    f"this session has {len(session.jobs)} unfinished jobs; wait or cancel one")
            local = self.local.get(oldest)
            if local is not None:
                self._forget(local)
            await self._delete(oldest, session.session_id)
            await self.sessions.update(session.session_id,
                                       lambda s, gone=oldest: s.jobs.pop(gone, None))

    async def _create(self, job: Job, request: bytes) -> None:
        ttl = self.ttl_ms(job.session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(job.job_id), mapping={"state": _dumps(record(job)),
                                                     "owner": self.owner})
            pipe.pexpire(self.key(job.job_id), ttl)
            pipe.set(self.key(job.job_id, "lease"), self.owner, px=self.lease_ms)
            pipe.set(self.key(job.job_id, REQUEST), request, px=ttl)
            if job.session_id:
                pipe.sadd(self._session_keys(job.session_id), self.key(job.job_id),
                          self.key(job.job_id, "events"), self.key(job.job_id, REQUEST))
            pipe.sadd(self.active_key(job.client), job.job_id)
            pipe.pexpire(self.active_key(job.client), max(ttl, self.lease_ms))
            await pipe.execute()
        self._written[job.job_id] = set()

    async def _claim(self, owner: str, key: str, job: Job) -> str | None:
        """Makes ``key`` name ``job``, unless it names a job already: then that job's id."""
        name = self.idem_key(owner, key)
        ttl = self.ttl_ms(job.session_id)
        claimed = await self.redis.set(name, f"{job.job_id} {job.fingerprint}", nx=True, px=ttl)
        if not claimed:
            return await self.find(owner, key)
        await self.redis.hset(self.key(job.job_id), "idem", name)
        if job.session_id:
            await self.sessions.add_keys(job.session_id, name)
        return None

    def publish(self, job: Job) -> None:
        """The job changed (an event was emitted): written to Redis soon, in order."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._queue.put_nowait(job)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            jobs = [await queue.get()]
            while not queue.empty():
                jobs.append(queue.get_nowait())
            # One write per job with its events so far: the state is the job's latest.
            for job in {id(job): job for job in jobs}.values():
                try:
                    await self._write(job)
                except Exception:  # noqa: BLE001 - keep writing the others; readers poll again
                    logger.exception("job %s: writing its record to Redis failed",
                                     job.job_id[:10])
            for _ in jobs:
                queue.task_done()

    async def _write(self, job: Job) -> None:
        written = self._written.setdefault(job.job_id, set())
        sent = job.events_sent
        events = job.events[sent:]
        blobs = []
        for name, artifact in job.artifacts.items():
            if f"artifact:{name}" not in written:
                blobs.append((f"artifact:{name}", artifact.data))
        if job.result is not None and RESULT not in written:
            blobs.append((RESULT, job.result.data))
        args: list = [self.key(job.job_id), self.key(job.job_id, "events"),
                      self.ttl_ms(job.session_id), _dumps(record(job)),
                      self._session_keys(job.session_id), self.owner, len(events),
                      *[_dumps(e) for e in events], len(blobs)]
        for name, data in blobs:
            args += [self.key(job.job_id, name), data]
        kept = await self._script(args=args)
        if kept and job.status != "queued" and REQUEST not in written:
            # started (or ended): no other replica can take it over now
            await self.redis.delete(self.key(job.job_id, REQUEST))
            written.add(REQUEST)
        if kept and job.finished:  # its last event is written: nothing left to lease or count
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.key(job.job_id, "lease"))
                pipe.srem(self.active_key(job.client), job.job_id)
                await pipe.execute()
        job.events_sent = sent + len(events)
        written.update(name for name, _ in blobs)

    async def flush(self) -> None:
        if self._queue is not None:
            await self._queue.join()

    def watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """While this replica runs jobs: renews their leases; cancels those another replica
        cancelled; lets go of those whose records went (their session was deleted elsewhere, or
        expired) and of those found lost (this replica stalled past their lease)."""
        async with self._subscribed(self.cancels_channel) as cancelled:
            await self._watch_running(cancelled)

    async def _watch_running(self, cancelled: Callable[[float], Awaitable[None]]) -> None:
        renewed = 0.0
        while any(not job.finished for job in self.local.values()):
            await cancelled(min(WATCH_S, self.settings.lease_s / 4))
            # as of now: a job submitted during the wait is what a cancel may be about
            running = [job.job_id for job in self.local.values() if not job.finished]
            if not running:
                return
            renew = time.monotonic() - renewed >= self.settings.lease_s / 4
            try:
                cancel, gone, taken = await self._check(running, renew)
            except Exception:  # noqa: BLE001 - Redis unreachable for a moment: try again
                if _cancelling():
                    raise
                logger.exception("watching jobs in Redis failed")
                continue
            if renew:
                renewed = time.monotonic()
            for job_id in cancel:
                job = self.local.get(job_id)
                if job is not None and not job.finished and job.task is not None:
                    job.task.cancel()
            ended = [job_id for job_id in gone if job_id not in taken]
            if ended:  # (a job taken over has another replica's lease now)
                await self.redis.delete(*[self.key(job_id, "lease") for job_id in ended])
            for job_id in gone:
                job = self.local.get(job_id)
                if job is not None:
                    logger.warning("job %s: its record went or its lease lapsed: let go",
                                   job_id[:10])
                    self._forget(job)

    async def _check(self, job_ids: list[str],
                     renew: bool) -> tuple[list[str], list[str], list[str]]:
        """Of the jobs this replica runs: those another replica cancelled; those whose record
        went (deleted with their session, or expired), was finished as lost or taken over
        (also listed third). ``renew``: their leases are renewed too; one that had lapsed
        already is finished as lost here."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.key(job_id), "cancel", "state", "lost", "owner")
                if renew:
                    pipe.pexpire(self.key(job_id, "lease"), self.lease_ms)
            replies = await pipe.execute()
        states = replies[::2] if renew else replies
        leases = replies[1::2] if renew else [True] * len(job_ids)
        cancel, gone, taken = [], [], []
        for job_id, (flag, state, lost, owner), leased in zip(job_ids, states, leases,
                                                               strict=True):
            if owner is not None and owner.decode() != self.owner:
                gone.append(job_id)
                taken.append(job_id)
            elif state is None or lost:
                gone.append(job_id)
            elif not leased and json.loads(state)["status"] not in FINISHED:
                # (a job that has just finished here has no lease left: it is not lost)
                await self._finish_lost(job_id)
                gone.append(job_id)
            elif flag:
                cancel.append(job_id)
        return cancel, gone, taken

    def forget(self, job_id: str) -> None:
        self._written.pop(job_id, None)

    @contextlib.asynccontextmanager
    async def _subscribed(self, channel: str) -> AsyncIterator[Callable[[float],
                                                                        Awaitable[None]]]:
        """Subscribed to ``channel`` meanwhile: yields ``wait(timeout_s)``, which returns when
        a message comes (or the subscription is confirmed), or after ``timeout_s``."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(channel)

            async def wait(timeout_s: float) -> None:
                try:
                    await pubsub.get_message(timeout=timeout_s)
                except Exception:  # noqa: BLE001 - connection dropped: the fallback's pace
                    if _cancelling():
                        raise
                    logger.warning("job store: a subscription failed; waiting %.1f s instead",
                                   timeout_s, exc_info=True)
                    await asyncio.sleep(timeout_s)

            yield wait
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await pubsub.aclose()

    # ---- any replica --------------------------------------------------------------------------

    async def active_jobs(self, client: str, here: int) -> int:
        """From the client's set in Redis; members found finished (a lapsed lease finishes its
        job here) or gone are dropped from it."""
        key = self.active_key(client)
        active, ended = 0, []
        for member in await self.redis.smembers(key):
            job_id = member.decode()
            view = self.local.get(job_id) or await self.load(job_id)
            if view is None or view.finished:
                ended.append(job_id)
            else:
                active += 1
        if ended:
            await self.redis.srem(key, *ended)
        return max(active, here)

    async def find(self, owner: str, key: str) -> str | None:
        value = await self.redis.get(self.idem_key(owner, key))
        if value is None:
            return None
        job_id, _fingerprint = value.decode().split(" ", 1)
        return job_id

    async def _state(self, job_id: str) -> dict | None:
        state = await self.redis.hget(self.key(job_id), "state")
        return json.loads(state) if state is not None else None

    async def load(self, job_id: str) -> Job | None:
        """The job as its record shows it; one whose lease lapsed is finished as lost first."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.key(job_id), "state")
            pipe.exists(self.key(job_id, "lease"))
            raw, leased = await pipe.execute()
        if raw is None:
            return None
        state = json.loads(raw)
        if state["status"] not in FINISHED and not leased:
            await self._lapsed(job_id)
            if job_id in self.local:  # taken over: this replica runs it now
                return self.local[job_id]
            state = await self._state(job_id)
            if state is None:
                return None
        if state["kind"] not in self.kinds:
            return None
        return self._view(job_id, state)

    async def _lapsed(self, job_id: str) -> None:
        """The job's lease lapsed: taken over here if it was queued, else finished as lost."""
        if not await self._take_over(job_id):
            await self._finish_lost(job_id)

    async def _take_over(self, job_id: str) -> bool:
        """Claims a queued job whose replica was lost and queues it here (``adopt``), with its
        events so far; False when it was not queued, or another replica claimed it first."""
        body = await self._claim_queued(args=[self.key(job_id), self.key(job_id, "lease"),
                                              self.key(job_id, REQUEST), self.owner,
                                              self.lease_ms])
        if body is None:
            return False
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(self.key(job_id), "state")
                pipe.lrange(self.key(job_id, "events"), 0, -1)
                raw, events = await pipe.execute()
            job = self._view(job_id, json.loads(raw))
            request = decode_request(body)
        except Exception:  # noqa: BLE001 - a record this replica cannot run: it fails as lost
            logger.exception("job %s: taking it over failed", job_id[:10])
            await self.redis.delete(self.key(job_id, "lease"))
            return False
        job.remote, job.recorded_eta, job.queue_position = False, None, None
        job.events = [json.loads(e) for e in events]
        job.events_sent = len(job.events)
        self._written[job_id] = set()
        self._adopt(job, request)
        return True

    async def _finish_lost(self, job_id: str) -> None:
        """The job's replica stopped renewing its lease: the job fails as retryable, with its
        last event, unless it finished or its lease came back meanwhile (checked in Redis)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.key(job_id), "state")
            pipe.llen(self.key(job_id, "events"))
            raw, count = await pipe.execute()
        if raw is None:
            return
        state = json.loads(raw)
        if state["status"] in FINISHED:
            return
        state.update(status="failed", error=GATEWAY_LOST, finished_at=time.time(),
                     queue_position=None, eta_s=0.0)
        event = {"seq": count, "job_id": job_id, "status": "failed",
                 "progress": round(state["progress"], 4), "type": "failed",
                 "error": GATEWAY_LOST, "eta_s": 0.0}
        if await self._lost(args=[self.key(job_id), self.key(job_id, "events"),
                                  self.key(job_id, "lease"), raw, count, _dumps(state),
                                  _dumps(event)]):
            logger.warning("job %s: its Gateway replica's lease lapsed; failed as retryable",
                           job_id[:10])

    def _view(self, job_id: str, state: dict) -> Job:
        """A job another replica runs, as its record describes it (bytes not read)."""
        job = Job(job_id, self.kinds[state["kind"]], state["session_id"], state["client"],
                  state["fingerprint"], created_at=state["created_at"], status=state["status"],
                  stage=state["stage"], step=state["step"], total=state["total"],
                  progress=state["progress"], queue_position=state["queue_position"],
                  started_at=state["started_at"], finished_at=state["finished_at"],
                  error=state["error"], stage_ms=state["stage_ms"], remote=True,
                  recorded_eta=state["eta_s"], request=state.get("request"))
        job.artifacts = {name: Artifact(a["media_type"], b"", a["meta"])
                         for name, a in state["artifacts"].items()}
        if state["result"] is not None:
            job.result = Artifact(state["result"]["media_type"], b"", state["result"]["meta"])
        return job

    async def events(self, job_id: str, after: int) -> AsyncIterator[dict]:
        """Polled from the job's event list until its last event (which a lapsed lease makes
        ``failed``, so a follower never waits on a dead replica)."""
        index = after + 1
        async with self._subscribed(self.key(job_id, "events")) as appended:
            while True:  # subscribed before reading: nothing appended meanwhile is missed
                events, exists, leased = await self._events_from(job_id, index)
                for event in events:
                    yield event
                    index += 1
                    if event["type"] in FINISHED:
                        return
                if not exists:
                    return
                if not events:
                    if not leased:
                        await self._lapsed(job_id)
                        continue
                    await appended(POLL_S)

    async def _events_from(self, job_id: str, start: int) -> tuple[list[dict], bool, bool]:
        """Events from index ``start`` on, whether the job's record still exists and whether
        its lease does (it goes some time after the job finishes)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.key(job_id, "events"), start, -1)
            pipe.exists(self.key(job_id))
            pipe.exists(self.key(job_id, "lease"))
            events, exists, leased = await pipe.execute()
        return [json.loads(e) for e in events], bool(exists), bool(leased)

    async def cancel(self, job: Job, timeout_s: float = 30.0) -> Job:
        """Asks the running replica to cancel, and waits until it says it has."""
        job_id = job.job_id
        deadline = time.monotonic() + timeout_s
        async with self._subscribed(self.key(job_id, "events")) as appended:
            await self.redis.hset(self.key(job_id), "cancel", "1")
            await self.redis.publish(self.cancels_channel, job_id)
            while not job.finished and time.monotonic() < deadline:
                await appended(POLL_S)
                found = await self.load(job_id)
                if found is None:
                    raise NotFound(JOB_GONE)
                job = found
        return job

    async def data(self, job_id: str, artifact: str | None) -> bytes | None:
        name = f"artifact:{artifact}" if artifact is not None else RESULT
        return await self.redis.get(self.key(job_id, name))

    async def prefetch(self, session: Session, job_ids: list[str]) -> None:
        for job_id in job_ids:
            if job_id not in session.jobs or session.jobs[job_id] is not None:
                continue
            view = await self.load(job_id)
            if view is None:
                continue
            if view.result is not None:
                view.result.data = await self.data(job_id, None) or b""
            session.jobs[job_id] = view

    def use_session(self, job: Job) -> None:
        pass  # the sticky UI's session copy is this replica's, as of its last load

    async def load_session(self, job: Job) -> None:
        if job.session_id is not None:
            try:
                await self.sessions.load(job.session_id)  # keeps the session alive
            except NotFound:
                raise NotFound(JOB_GONE) from None

    async def _statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's status; None for one whose record is gone."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "state")
            states = await pipe.execute()
        return {job_id: json.loads(s)["status"] if s is not None else None
                for job_id, s in zip(job_ids, states, strict=True)}

    async def _delete(self, job_id: str, session_id: str | None) -> None:
        """The job's records and its idempotency key."""
        state, idem = await self.redis.hmget(self.key(job_id), "state", "idem")
        keys = [self.key(job_id), self.key(job_id, "events"), self.key(job_id, RESULT),
                self.key(job_id, "lease"), self.key(job_id, REQUEST)]
        if state is not None:
            keys += [self.key(job_id, f"artifact:{name}")
                     for name in json.loads(state)["artifacts"]]
        if idem is not None:
            keys.append(idem.decode())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            if session_id:
                pipe.srem(self._session_keys(session_id), *keys)
            await pipe.execute()
        self._written.pop(job_id, None)
