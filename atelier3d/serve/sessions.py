"""Per-image sessions: the image, its embedding reference, and objects with undo/redo history.

``SessionStore`` keeps them in this Gateway replica's memory, least-recently-used with an idle
TTL (the default, ``sessions.backend: memory``). ``atelier3d.serve.redis_store.RedisSessionStore``
(``sessions.backend: redis``) keeps them in Redis, so that any Gateway replica, on any node, can
serve any request of a session. Both offer the same async interface, which the services use:
``create``, ``load``, ``update`` (read-modify-write, under the session's lock in Redis) and
``remove``; the synchronous ``get`` is what this replica holds (all of it in memory; with Redis,
the copy this replica last loaded, which is what the sticky Gradio UI reads).

Ids come from ``secrets`` (144 bits) and are capabilities: whoever holds one may use the
session, nobody can guess one. With API keys on, a session is also its key's: another key gets
the 404 of an unknown id (``serve.auth``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from atelier3d.errors import NotFound, TooManyRequests
from atelier3d.metrics import set_active_sessions
from atelier3d.serve.auth import visible

T = TypeVar("T")


@dataclass
class Candidate:
    rle: dict
    score: float
    bbox: list[int]
    area: int


@dataclass
class Step:
    """One segmentation result recorded in an object's history."""

    points: list[tuple[float, float]]
    labels: list[int]
    box: tuple[float, float, float, float] | None
    candidates: list[Candidate]
    low_res: np.ndarray  # (K, 256, 256) logits of the candidates, for refinement
    selected: int
    uid: str | None = None  # its record's id in a shared store (Redis); None until saved there


@dataclass
class SegObject:
    object_id: str
    max_history: int
    # A ``None`` step is a reset: the object is empty again, and undo brings back what was there.
    steps: list[Step | None] = field(default_factory=list)
    cursor: int = 0  # number of steps in effect; steps[cursor:] can be redone

    @property
    def current(self) -> Step | None:
        return self.steps[self.cursor - 1] if self.cursor else None

    def push(self, step: Step | None) -> int:
        del self.steps[self.cursor:]
        self.steps.append(step)
        if len(self.steps) > self.max_history:
            del self.steps[0]
        self.cursor = len(self.steps)
        return self.cursor

    def undo(self) -> None:
        self.cursor = max(0, self.cursor - 1)

    def redo(self) -> None:
        self.cursor = min(len(self.steps), self.cursor + 1)

    def reset(self) -> None:
        """Back to empty, as an undoable step."""
        if self.current is not None:
            self.push(None)


@dataclass
class Session:
    session_id: str
    client: str
    image: np.ndarray
    last_used: float
    embedding_ref: Any = None  # ray.ObjectRef once encoded; None when not (or no longer) resident
    embedding_task: asyncio.Task | None = None
    embedding_failed: bool = False
    objects: dict[str, SegObject] = field(default_factory=dict)
    # Body/garment parses (``atelier3d.serve.parsing.StoredParse``) by id, oldest first.
    parses: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    # Edit and mesh jobs (``atelier3d.serve.jobs.Job``) by id, oldest first; they go with it.
    jobs: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def get_object(self, object_id: str) -> SegObject:
        try:
            return self.objects[object_id]
        except KeyError:
            raise NotFound(f"object {object_id!r} not found in this session") from None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(18)}"


def new_step_uid() -> str:
    return secrets.token_urlsafe(9)


class SessionStore:
    """In memory, in this replica. ``on_drop`` hooks run for every session that leaves."""

    backend = "memory"

    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        max_per_client: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # Called with each session that leaves (deleted, expired or pushed out): the services
        # that keep things for a session (jobs) let go of them.
        self.on_drop: list[Callable[[Session], None]] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def expires_in(self, session: Session) -> float:
        return max(0.0, session.last_used + self.ttl_s - self.clock())

    def sweep(self) -> list[Session]:
        """Drops expired sessions (oldest first, so the scan stops at the first live one)."""
        now = self.clock()
        dropped = []
        while self._sessions:
            session = next(iter(self._sessions.values()))
            if session.last_used + self.ttl_s > now:
                break
            dropped.append(self._drop(session.session_id))
        return dropped

    def add(self, client: str, image: np.ndarray) -> Session:
        self.sweep()
        if sum(1 for s in self._sessions.values() if s.client == client) >= self.max_per_client:
            raise TooManyRequests(
                f"this client already has {self.max_per_client} sessions; delete one first"
            )
        while len(self._sessions) >= self.max_sessions:
            self._drop(next(iter(self._sessions)))
        session = Session(new_id("ses"), client, image, self.clock())
        self._sessions[session.session_id] = session
        set_active_sessions(len(self._sessions))
        return session

    def get(self, session_id: str) -> Session:
        self.sweep()
        session = self._sessions.get(session_id)
        if session is None or not visible(session.client):  # another key's: as if not there
            raise NotFound("session not found (it may have expired)")
        session.last_used = self.clock()
        self._sessions.move_to_end(session_id)
        return session

    def find(self, session_id: str) -> Session | None:
        """The session if it is live, without counting as a use."""
        return self._sessions.get(session_id)

    def delete(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is None or not visible(session.client):
            raise NotFound("session not found (it may have expired)")
        self._drop(session_id)

    def _drop(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id)
        set_active_sessions(len(self._sessions))
        if session.embedding_task is not None and not session.embedding_task.done():
            session.embedding_task.cancel()
        session.embedding_ref = None  # releases the object-store copy
        for callback in self.on_drop:
            callback(session)
        return session

    # ---- the async interface the services use (RedisSessionStore implements it too) -----------

    async def create(self, client: str, image: np.ndarray, data: bytes | None = None) -> Session:
        """A new session for ``image`` (``data``: its upload, which a shared store keeps)."""
        return self.add(client, image)

    async def load(self, session_id: str) -> Session:
        """The session, as a use (refreshes its TTL); 404 if it is not live."""
        return self.get(session_id)

    async def update(self, session_id: str, change: Callable[[Session], T]) -> T:
        """Runs ``change`` on the session (a read-modify-write) and keeps the result. In memory
        the session is this process's object, so this is a plain call; the Redis store runs it on
        the latest record under the session's lock and writes the record back."""
        return change(self.get(session_id))

    async def remove(self, session_id: str) -> None:
        self.delete(session_id)

    def resident_embeddings(self) -> list[Session]:
        """Sessions holding an embedding, least recently used first."""
        return [s for s in self._sessions.values() if s.embedding_ref is not None]
