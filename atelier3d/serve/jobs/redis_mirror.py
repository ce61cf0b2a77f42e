"""Job records in Redis (with ``sessions.backend: redis``): any Gateway replica answers a job's
status, events and results; the replica that took the submission runs it.

A job runs where it was submitted: its queue slot, its streaming call to the model and its
asyncio task live in that replica (``JobService``), which writes what happens to Redis as it
happens, in order, from one writer task:

- ``P:job:<id>``: hash ``state`` (JSON: what ``GET /v1/jobs/<id>`` shows, the ETA as of the last
  event), ``cancel`` (set by another replica's ``DELETE``), ``idem`` (its idempotency key's name);
- ``P:job:<id>:events``: list of the events (JSON), the NDJSON/SSE stream's ``seq`` = index;
- ``P:job:<id>:artifact:<name>``, ``P:job:<id>:result``: the bytes;
- ``P:idem:<sha256(owner, key)>``: ``<job id> <fingerprint>`` (``SET NX``: one job per key across
  replicas).

A session's jobs are listed in its record and their keys in the session's key set, so they live
and go with it (TTL refreshed by each use of the session); a job without a session lives
``jobs.ttl_s`` from its last event. Another replica follows a job by polling its event list,
cancels it by setting ``cancel``, which the running replica's watcher sees within
``WATCH_S``; the watcher also cancels jobs whose records went (their session was deleted
elsewhere, or expired). Queue positions and ETAs are the running replica's (each replica has its
own queue, ``jobs.<kind>.max_running`` each).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

logger = logging.getLogger("ray.serve")

WATCH_S = 0.25  # how often a replica looks for cancellations of the jobs it runs
POLL_S = 0.1  # how often a follower on another replica looks for new events

# ARGV: hash, events, ttl_ms, state, session key set ('' if none), n events, events...,
#       m records, m x (key, value) -> 0 if the job's record is gone (nothing written), else 1
_WRITE = """
local hash, events, ttl, skeys = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5]
if redis.call('EXISTS', hash) == 0 then return 0 end
redis.call('HSET', hash, 'state', ARGV[4])
local n = tonumber(ARGV[6])
local i = 7
for _ = 1, n do
  redis.call('RPUSH', events, ARGV[i])
  i = i + 1
end
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

RESULT = "result"


def record(job: Any) -> dict:
    """What another replica needs to show the job (``job_state``) and check a request on it."""
    eta = job.eta_s()
    return {
        "kind": job.kind.name, "session_id": job.session_id, "client": job.client,
        "fingerprint": job.fingerprint, "created_at": job.created_at, "status": job.status,
        "stage": job.stage, "step": job.step, "total": job.total, "progress": job.progress,
        "queue_position": job.queue_position, "started_at": job.started_at,
        "finished_at": job.finished_at, "error": job.error, "eta_s": eta,
        "artifacts": {name: {"media_type": a.media_type, "meta": a.meta}
                      for name, a in job.artifacts.items()},
        "result": ({"media_type": job.result.media_type, "meta": job.result.meta}
                   if job.result is not None else None),
        "stage_ms": job.stage_ms,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class JobMirror:
    def __init__(self, store: Any, settings: Any) -> None:
        self.store = store
        self.settings = settings
        self.redis = store.redis
        self.prefix = store.prefix
        self._script = self.redis.register_script(_WRITE)
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self._written: dict[str, set[str]] = {}  # job id -> its records written (artifacts, result)

    # ---- keys ---------------------------------------------------------------------------------

    def key(self, job_id: str, *rest: str) -> str:
        return ":".join([f"{self.prefix}:job:{job_id}", *rest])

    def idem_key(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    def ttl_ms(self, session_id: str | None) -> int:
        return self.store.ttl_ms if session_id else max(1, int(self.settings.ttl_s * 1000))

    def _session_keys(self, session_id: str | None) -> str:
        return self.store.key(session_id, "keys") if session_id else ""

    # ---- the running replica's side -----------------------------------------------------------

    async def create(self, job: Any) -> None:
        ttl = self.ttl_ms(job.session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(job.job_id), mapping={"state": _dumps(record(job))})
            pipe.pexpire(self.key(job.job_id), ttl)
            if job.session_id:
                pipe.sadd(self._session_keys(job.session_id), self.key(job.job_id),
                          self.key(job.job_id, "events"))
            await pipe.execute()
        self._written[job.job_id] = set()

    async def claim(self, owner: str, key: str, job: Any) -> tuple[str, str] | None:
        """Makes ``key`` name ``job``, unless it names a job already: then ``(its id, its
        request's fingerprint)``."""
        name = self.idem_key(owner, key)
        ttl = self.ttl_ms(job.session_id)
        claimed = await self.redis.set(name, f"{job.job_id} {job.fingerprint}", nx=True, px=ttl)
        if not claimed:
            return await self.find(owner, key)
        await self.redis.hset(self.key(job.job_id), "idem", name)
        if job.session_id:
            await self.store.add_keys(job.session_id, name)
        return None

    async def find(self, owner: str, key: str) -> tuple[str, str] | None:
        value = await self.redis.get(self.idem_key(owner, key))
        if value is None:
            return None
        job_id, fingerprint = value.decode().split(" ", 1)
        return job_id, fingerprint

    def publish(self, job: Any) -> None:
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

    async def _write(self, job: Any) -> None:
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
                      self._session_keys(job.session_id), len(events),
                      *[_dumps(e) for e in events], len(blobs)]
        for name, data in blobs:
            args += [self.key(job.job_id, name), data]
        await self._script(args=args)
        job.events_sent = sent + len(events)
        written.update(name for name, _ in blobs)

    async def flush(self) -> None:
        """Waits until everything published so far is written."""
        if self._queue is not None:
            await self._queue.join()

    async def watch(self, job_ids: list[str]) -> tuple[list[str], list[str]]:
        """Of the jobs this replica runs: those another replica cancelled, those whose record
        went (deleted with their session, or expired)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.key(job_id), "cancel", "state")
            replies = await pipe.execute()
        cancel = [j for j, (flag, _) in zip(job_ids, replies, strict=True) if flag]
        gone = [j for j, (_, state) in zip(job_ids, replies, strict=True) if state is None]
        return cancel, gone

    # ---- any replica --------------------------------------------------------------------------

    async def load(self, job_id: str) -> dict | None:
        state = await self.redis.hget(self.key(job_id), "state")
        return json.loads(state) if state is not None else None

    async def events(self, job_id: str, start: int) -> tuple[list[dict], bool]:
        """Events from index ``start`` on, and whether the job's record still exists."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.key(job_id, "events"), start, -1)
            pipe.exists(self.key(job_id))
            events, exists = await pipe.execute()
        return [json.loads(e) for e in events], bool(exists)

    async def data(self, job_id: str, artifact: str | None) -> bytes | None:
        name = f"artifact:{artifact}" if artifact is not None else RESULT
        return await self.redis.get(self.key(job_id, name))

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.hset(self.key(job_id), "cancel", "1")

    async def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's status; None for one whose record is gone."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "state")
            states = await pipe.execute()
        return {job_id: json.loads(s)["status"] if s is not None else None
                for job_id, s in zip(job_ids, states, strict=True)}

    async def delete(self, job_id: str, session_id: str | None) -> None:
        """The job's records and its idempotency key."""
        state, idem = await self.redis.hmget(self.key(job_id), "state", "idem")
        keys = [self.key(job_id), self.key(job_id, "events"), self.key(job_id, RESULT)]
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

    def forget(self, job_id: str) -> None:
        self._written.pop(job_id, None)
