"""Sessions in this Gateway replica's memory (``sessions.backend: memory``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from atelier3d.errors import NotFound, TooManyRequests
from atelier3d.metrics import set_active_sessions
from atelier3d.serve.auth import visible
from atelier3d.serve.sessions.session import Session, new_id

T = TypeVar("T")


class MemorySessionStore:
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
