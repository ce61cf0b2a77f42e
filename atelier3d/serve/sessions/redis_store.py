"""Sessions in Redis (``sessions.backend: redis``): any Gateway replica, on any node, serves any
request of any session.

Keys (``P`` = ``sessions.redis_prefix``; ``{sid}`` is a hash tag, so one session's keys share a
cluster slot):

- ``P:s:{sid}``: hash ``client``, ``h``, ``w``, ``version`` (+1 per change) and ``state``, JSON:
  per object its step ids (``null`` for a reset), selected candidates and cursor; parse ids; job
  ids. Small: it is what every change rewrites.
- ``P:s:{sid}:image``: the upload's bytes (compressed already; every replica decodes the same
  pixels from them). ``P:s:{sid}:step:<uid>``, ``P:s:{sid}:parse:<pid>``: immutable records
  (``atelier3d.serve.sessions.records``), written once, cached by the replicas that read them.
- ``P:s:{sid}:keys``: every other key of the session (its steps, parses, jobs' records), so that
  one touch refreshes them all and one delete removes them all.
- ``P:s:{sid}:lock``: the session's lock (``SET NX PX``) around each read-modify-write.
- ``P:sessions``, ``P:client:<client>``: sorted sets of session ids by last use (Redis's clock),
  for ``sessions.max_sessions`` (least recently used goes first) and the per-client quota.

Each use refreshes the TTL (``PEXPIRE`` of every key of the session, ``sessions.ttl_s``) in one
Lua call that also returns the record's version, and the record only when it differs from the
version this replica holds: a replica that keeps serving a session (sticky routing) reads a few
bytes per request, one that has not seen it reads the record once.

What stays in each replica: the decoded image, the embedding's ``ObjectRef`` (the object store
copy belongs to the replica that made it) and the encode in flight. A replica without the
embedding re-encodes from the stored image (counted as a miss,
``ray_atelier_gateway_embedding_total``): that cost is what sticky routing avoids. Lua scripts
name keys they compute, so this is for one Redis server (or a primary with replicas/Sentinel),
not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import atelier3d.serve.sessions.records as records
from atelier3d.errors import NotFound, TooManyRequests, Unavailable
from atelier3d.imaging import decode_image, encode_png
from atelier3d.metrics import set_active_sessions
from atelier3d.serve.auth import visible
from atelier3d.serve.sessions.session import SegObject, Session, Step, T, new_id, new_step_uid

logger = logging.getLogger("ray.serve")

_COMMON = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function base_of(p, sid) return p .. ':s:{' .. sid .. '}' end
local function drop(p, sid)
  local base = base_of(p, sid)
  local client = redis.call('HGET', base, 'client')
  for _, k in ipairs(redis.call('SMEMBERS', base .. ':keys')) do redis.call('DEL', k) end
  local existed = redis.call('DEL', base)
  redis.call('DEL', base .. ':keys', base .. ':image')
  redis.call('ZREM', p .. ':sessions', sid)
  if client then redis.call('ZREM', p .. ':client:' .. client, sid) end
  return existed
end
"""

# ARGV: prefix, sid, client, ttl_ms, max_sessions, max_per_client, h, w, state, image
# -> {sessions now, evicted ids...}, or -1 when the client has its quota already.
_CREATE = _COMMON + """
local p, sid, client, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = now()
local all, mine = p .. ':sessions', p .. ':client:' .. client
for _, zset in ipairs({all, mine}) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', t - ttl / 1000)) do
    drop(p, id)
  end
end
for _, id in ipairs(redis.call('ZRANGE', mine, 0, -1)) do
  if redis.call('EXISTS', base_of(p, id)) == 0 then drop(p, id) end
end
if redis.call('ZCARD', mine) >= tonumber(ARGV[6]) then return -1 end
local out = {0}
while redis.call('ZCARD', all) >= tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', all, 0, 0)[1]
  drop(p, oldest)
  table.insert(out, oldest)
end
local base = base_of(p, sid)
redis.call('HSET', base, 'client', client, 'h', ARGV[7], 'w', ARGV[8], 'version', 1,
           'state', ARGV[9])
redis.call('PEXPIRE', base, ttl)
redis.call('SET', base .. ':image', ARGV[10], 'PX', ttl)
redis.call('ZADD', all, t, sid)
redis.call('ZADD', mine, t, sid)
out[1] = redis.call('ZCARD', all)
return out
"""

# ARGV: prefix, sid, ttl_ms, known version -> nil (no session), {version} when the caller's is
# current, else {version, state, client, h, w}. Refreshes the TTL of every key of the session.
_TOUCH = _COMMON + """
local p, sid, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local base = base_of(p, sid)
if redis.call('EXISTS', base) == 0 then return false end
for _, k in ipairs(redis.call('SMEMBERS', base .. ':keys')) do redis.call('PEXPIRE', k, ttl) end
redis.call('PEXPIRE', base, ttl)
redis.call('PEXPIRE', base .. ':keys', ttl)
redis.call('PEXPIRE', base .. ':image', ttl)
local t = now()
local client = redis.call('HGET', base, 'client')
redis.call('ZADD', p .. ':sessions', t, sid)
redis.call('ZADD', p .. ':client:' .. client, t, sid)
local version = redis.call('HGET', base, 'version')
if version == ARGV[4] then return {version} end
return redis.call('HMGET', base, 'version', 'state', 'client', 'h', 'w')
"""

# ARGV: prefix, sid, ttl_ms, new version, state, n new records, n x (key, value), removed keys...
# -> 0 when the session is gone (deleted or expired meanwhile), -1 when the record is no longer
# at version - 1 (another replica wrote it after this one's lock expired), else 1. Nothing is
# written unless 1: the version check is the compare-and-set that the lock alone is not.
_SAVE = _COMMON + """
local p, sid, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local base = base_of(p, sid)
if redis.call('EXISTS', base) == 0 then return 0 end
if tonumber(redis.call('HGET', base, 'version')) ~= tonumber(ARGV[4]) - 1 then return -1 end
local n = tonumber(ARGV[6])
for i = 0, n - 1 do
  local key = ARGV[7 + 2 * i]
  redis.call('SET', key, ARGV[8 + 2 * i], 'PX', ttl)
  redis.call('SADD', base .. ':keys', key)
end
for i = 7 + 2 * n, #ARGV do
  redis.call('DEL', ARGV[i])
  redis.call('SREM', base .. ':keys', ARGV[i])
end
redis.call('HSET', base, 'version', ARGV[4], 'state', ARGV[5])
redis.call('PEXPIRE', base, ttl)
redis.call('PEXPIRE', base .. ':keys', ttl)
return 1
"""

# ARGV: prefix, sid -> {existed, sessions left}
_DROP = _COMMON + """
local existed = drop(ARGV[1], ARGV[2])
return {existed, redis.call('ZCARD', ARGV[1] .. ':sessions')}
"""


SAVE_ATTEMPTS = 5  # a change is applied again when another replica wrote the record meanwhile


class _VersionConflict(Exception):
    """The record is no longer the version this replica's change was applied to."""


@dataclass
class _Held:
    """This replica's copy of a session and the version of the record it reflects."""

    session: Session
    version: int
    steps: set[str] = field(default_factory=set)  # step ids in that record
    parses: set[str] = field(default_factory=set)
    local_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSessionStore:
    """The session store in Redis; the interface of ``SessionStore`` (``create``, ``load``,
    ``update``, ``remove``; ``get``/``find`` give this replica's copy)."""

    backend = "redis"

    def __init__(self, url: str, *, ttl_s: float, max_sessions: int, max_per_client: int,
                 max_history: int, prefix: str = "atelier3d", lock_timeout_s: float = 10.0,
                 lock_wait_s: float = 30.0, max_pixels: int = 36_000_000,
                 clock: Callable[[], float] = time.monotonic, client: Any = None,
                 password: str | None = None) -> None:
        import redis.asyncio

        # a password in the URL wins over ``password`` (redis-py's from_url)
        self.redis = client or redis.asyncio.Redis.from_url(url, password=password)
        self.url = url
        self.ttl_s = ttl_s
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.max_history = max_history
        self.prefix = prefix
        self.lock_timeout_s = lock_timeout_s
        self.lock_wait_s = lock_wait_s
        self.max_pixels = max_pixels
        self.clock = clock
        self.on_drop: list[Callable[[Session], None]] = []
        # Jobs this replica runs, by id (JobService sets it): a session's job ids map to them.
        self.job_lookup: Callable[[str], Any] = lambda job_id: None
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._count = 0
        self._create = self.redis.register_script(_CREATE)
        self._touch = self.redis.register_script(_TOUCH)
        self._save = self.redis.register_script(_SAVE)
        self._drop = self.redis.register_script(_DROP)

    # ---- keys ---------------------------------------------------------------------------------

    def key(self, session_id: str, *rest: str) -> str:
        return ":".join([f"{self.prefix}:s:{{{session_id}}}", *rest])

    def _step_key(self, session_id: str, uid: str) -> str:
        return self.key(session_id, "step", uid)

    def _parse_key(self, session_id: str, parse_id: str) -> str:
        return self.key(session_id, "parse", parse_id)

    # ---- this replica's copies ----------------------------------------------------------------

    def __len__(self) -> int:
        """Live sessions, all replicas together, as of this replica's last create or delete."""
        return self._count

    def __iter__(self):
        return iter([held.session for held in self._held.values()])

    def get(self, session_id: str) -> Session:
        """This replica's copy (as of its last load or change here): for synchronous callers,
        the Gradio UI (sticky: its session's requests come here)."""
        held = self._held.get(session_id)
        if held is None or not visible(held.session.client):
            raise NotFound("session not found on this Gateway replica (it may have expired)")
        return held.session

    def find(self, session_id: str) -> Session | None:
        held = self._held.get(session_id)
        return held.session if held is not None else None

    def expires_in(self, session: Session) -> float:
        return max(0.0, session.last_used + self.ttl_s - self.clock())

    def sweep(self) -> list[Session]:
        """Redis expires sessions itself; a copy here goes when a load finds its record gone."""
        return []

    def resident_embeddings(self) -> list[Session]:
        """Sessions whose embedding this replica holds, least recently used first."""
        return [h.session for h in self._held.values() if h.session.embedding_ref is not None]

    def _hold(self, held: _Held) -> None:
        self._held[held.session.session_id] = held
        self._held.move_to_end(held.session.session_id)
        while len(self._held) > self.max_sessions:
            _, old = self._held.popitem(last=False)
            self._release(old.session)

    @staticmethod
    def _release(session: Session) -> None:
        if session.embedding_task is not None and not session.embedding_task.done():
            session.embedding_task.cancel()
        session.embedding_ref = None

    def _forget(self, session_id: str, session: Session | None = None) -> None:
        """The session has gone (here or elsewhere): let go of this replica's copy and tell the
        ``on_drop`` hooks (a stand-in session when this replica never held it)."""
        held = self._held.pop(session_id, None)
        session = held.session if held is not None else session
        if session is None:
            session = Session(session_id, "", np.zeros((1, 1, 3), np.uint8), self.clock())
        self._release(session)
        for callback in self.on_drop:
            callback(session)

    # ---- the async interface ------------------------------------------------------------------

    async def create(self, client: str, image: np.ndarray, data: bytes | None = None) -> Session:
        if data is None:
            data = await asyncio.to_thread(encode_png, np.ascontiguousarray(image))
        session = Session(new_id("ses"), client, image, self.clock())
        state = json.dumps({"objects": {}, "parses": [], "jobs": []})
        height, width = session.size
        out = await self._create(args=[self.prefix, session.session_id, client, self.ttl_ms,
                                       self.max_sessions, self.max_per_client, height, width,
                                       state, data])
        if out == -1:
            raise TooManyRequests(
                f"this client already has {self.max_per_client} sessions; delete one first")
        self._count = int(out[0])
        set_active_sessions(self._count)
        for evicted in out[1:]:
            self._forget(_text(evicted))
        self._hold(_Held(session, version=1))
        return session

    async def load(self, session_id: str) -> Session:
        return (await self._load(session_id)).session

    async def _load(self, session_id: str) -> _Held:
        """Refreshes the TTL and brings this replica's copy up to the record's version."""
        held = self._held.get(session_id)
        known = str(held.version) if held is not None else ""
        try:
            reply = await self._touch(args=[self.prefix, session_id, self.ttl_ms, known])
        except Exception as exc:  # noqa: BLE001 - Redis down: a 503 to retry, not a 500
            raise Unavailable(f"the session store is unreachable: {exc}", retry_after_s=2) from exc
        if reply is None:
            if held is not None:
                self._forget(session_id)
            raise NotFound("session not found (it may have expired)")
        version = int(reply[0])
        if len(reply) > 1:
            held = await self._refresh(session_id, version, reply)
        if not visible(held.session.client):  # another API key's session: as if not there
            raise NotFound("session not found (it may have expired)")
        held.session.last_used = self.clock()
        self._held.move_to_end(session_id)
        return held

    async def _refresh(self, session_id: str, version: int, reply: list) -> _Held:
        """This replica's copy rebuilt from the record ``reply`` (version ``version``): records
        it has not seen are read once; the embedding and encode in flight stay."""
        _, state_raw, client, height, width = reply
        state = json.loads(state_raw)
        held = self._held.get(session_id)
        if held is None:
            data = await self.redis.get(self.key(session_id, "image"))
            if data is None:
                raise NotFound("session not found (it may have expired)")
            image = await asyncio.to_thread(decode_image, data, max(self.max_pixels,
                                                                    int(height) * int(width)))
            held = _Held(Session(session_id, _text(client), image, self.clock()), version=0)
            if session_id in self._held:  # another request of this replica got there first
                held = self._held[session_id]
            else:
                self._hold(held)
        session = held.session
        known_steps = {step.uid: step for obj in session.objects.values() for step in obj.steps
                       if step is not None and step.uid}
        wanted_steps = [uid for obj in state["objects"].values() for uid in obj["steps"]
                        if uid and uid not in known_steps]
        wanted_parses = [pid for pid in state["parses"] if pid not in session.parses]
        keys = ([self._step_key(session_id, uid) for uid in wanted_steps]
                + [self._parse_key(session_id, pid) for pid in wanted_parses])
        blobs = await self.redis.mget(keys) if keys else []
        if any(blob is None for blob in blobs):
            raise NotFound("session not found (it may have expired)")
        steps = dict(known_steps)
        for uid, blob in zip(wanted_steps, blobs, strict=False):
            steps[uid] = records.unpack_step(blob, uid)
        parses = dict(session.parses)
        if wanted_parses:
            unpacked = await asyncio.to_thread(
                lambda: [records.unpack_parse(b) for b in blobs[len(wanted_steps):]])
            parses.update(zip(wanted_parses, unpacked, strict=True))
        if held.version >= version:  # a newer copy arrived while this one was being read
            return held
        objects = {}
        for object_id, obj in state["objects"].items():
            seg = SegObject(object_id, self.max_history, cursor=int(obj["cursor"]))
            for uid, selected in zip(obj["steps"], obj["selected"], strict=True):
                step = steps[uid] if uid else None
                if step is not None:
                    step.selected = int(selected)
                seg.steps.append(step)
            objects[object_id] = seg
        session.objects = objects
        session.parses = OrderedDict((pid, parses[pid]) for pid in state["parses"])
        # Another replica's finished job read in for a job that uses it (prefetch) stays: a
        # later stage reads it from this copy, and a finished job's record does not change.
        read_in = {jid: job for jid, job in session.jobs.items()
                   if job is not None and job.remote and job.finished}
        session.jobs = OrderedDict((jid, self.job_lookup(jid) or read_in.get(jid))
                                   for jid in state["jobs"])
        held.version = version
        held.steps = {uid for obj in state["objects"].values() for uid in obj["steps"] if uid}
        held.parses = set(state["parses"])
        return held

    async def update(self, session_id: str, change: Callable[[Session], T]) -> T:
        """``change`` applied to the latest record under the session's lock, then written back
        (version + 1). Another replica's change waits for the lock, then sees this one.

        The lock expires (``lock_timeout_s``) so that a dead replica cannot hold a session; a
        change slower than that may find the record written by another replica meanwhile. The
        write is then refused (compare-and-set on the version) and ``change`` is applied again
        to the new record, at most ``SAVE_ATTEMPTS`` times, then a 503 to retry."""
        held = self._held.get(session_id)
        local = held.local_lock if held is not None else asyncio.Lock()
        async with local:  # this replica's requests queue here, not in Redis lock polling
            for attempt in range(SAVE_ATTEMPTS):
                try:
                    return await self._update_once(session_id, change)
                except _VersionConflict:
                    logger.warning("session %s: written by another replica during a change "
                                   "(attempt %d); applying it again", session_id[:10],
                                   attempt + 1)
            raise Unavailable("the session changed on another Gateway replica during this "
                              "change, repeatedly; retry shortly", retry_after_s=1)

    async def _update_once(self, session_id: str, change: Callable[[Session], T]) -> T:
        lock = self.redis.lock(self.key(session_id, "lock"), timeout=self.lock_timeout_s,
                               sleep=0.005, blocking_timeout=self.lock_wait_s)
        try:
            acquired = await lock.acquire()
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"the session store is unreachable: {exc}",
                              retry_after_s=2) from exc
        if not acquired:
            raise Unavailable("the session is busy; retry shortly", retry_after_s=1)
        try:
            held = await self._load(session_id)
            try:
                result = change(held.session)
                await self._write(held)
            except BaseException:
                held.version = -1  # this copy may hold a change the record lacks: re-read
                raise
            return result
        finally:
            try:
                await lock.release()
            except Exception:  # noqa: BLE001 - expired (a very slow change): logged only
                logger.warning("session %s: its lock expired before release",
                               session_id[:10])

    async def _write(self, held: _Held) -> None:
        session = held.session
        sid = session.session_id
        state: dict = {"objects": {}, "parses": list(session.parses), "jobs": list(session.jobs)}
        new: list[tuple[str, bytes]] = []
        new_steps: list[Step] = []
        steps: set[str] = set()
        for object_id, obj in session.objects.items():
            uids, selected = [], []
            for step in obj.steps:
                if step is not None and step.uid is None:
                    step.uid = new_step_uid()
                    new_steps.append(step)
                    step.low_res = records.shared_logits(step.low_res)
                    new.append((self._step_key(sid, step.uid), records.pack_step(step)))
                uids.append(step.uid if step is not None else None)
                selected.append(step.selected if step is not None else None)
                if step is not None:
                    steps.add(step.uid)
            state["objects"][object_id] = {"steps": uids, "selected": selected,
                                           "cursor": obj.cursor}
        fresh = [(pid, stored) for pid, stored in session.parses.items()
                 if pid not in held.parses]
        if fresh:
            packed = await asyncio.to_thread(
                lambda: [records.pack_parse(stored) for _, stored in fresh])
            new += [(self._parse_key(sid, pid), blob)
                    for (pid, _), blob in zip(fresh, packed, strict=True)]
        removed = ([self._step_key(sid, uid) for uid in held.steps - steps]
                   + [self._parse_key(sid, pid) for pid in held.parses - set(session.parses)])
        version = held.version + 1
        args: list = [self.prefix, sid, self.ttl_ms, version, json.dumps(state), len(new)]
        for key, blob in new:
            args += [key, blob]
        args += removed
        saved = await self._save(args=args)
        if saved == -1:
            for step in new_steps:  # not stored: new again when the change is applied again
                step.uid = None
            raise _VersionConflict(sid)
        if not saved:
            self._forget(sid)
            raise NotFound("session not found (it was deleted or expired meanwhile)")
        held.version, held.steps, held.parses = version, steps, set(session.parses)

    async def remove(self, session_id: str) -> None:
        existed, left = await self._drop(args=[self.prefix, session_id])
        self._count = int(left)
        set_active_sessions(self._count)
        if not existed:
            self._held.pop(session_id, None)
            raise NotFound("session not found (it may have expired)")
        self._forget(session_id)

    async def add_keys(self, session_id: str, *keys: str) -> None:
        """Other records that belong to the session (its jobs'): refreshed and deleted with it."""
        if keys:
            await self.redis.sadd(self.key(session_id, "keys"), *keys)

    async def close(self) -> None:
        await self.redis.aclose()
