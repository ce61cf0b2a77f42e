"""Per-image sessions: the image, its embedding reference, objects with undo/redo history.

``SessionStore`` is what the Gateway's services use; ``memory.MemorySessionStore`` (the default,
``sessions.backend: memory``) keeps sessions in this Gateway replica, least-recently-used with an
idle TTL; ``redis_store.RedisSessionStore`` (``sessions.backend: redis``) keeps them in Redis, so
that any Gateway replica, on any node, serves any request of a session.

Ids come from ``secrets`` (144 bits) and are capabilities: whoever holds one may use the
session, nobody can guess one. With API keys on, a session is also its key's: another key gets
the 404 of an unknown id (``serve.auth``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import numpy as np

from atelier3d.config import AppConfig
from atelier3d.serve.sessions.memory import MemorySessionStore
from atelier3d.serve.sessions.redis_store import RedisSessionStore
from atelier3d.serve.sessions.session import Session

T = TypeVar("T")


class SessionStore(Protocol):
    """``create``, ``load``, ``update`` (a read-modify-write; under the session's lock in Redis)
    and ``remove`` are the store; the synchronous ``get``/``find`` read what this replica holds
    (all of it in memory; with Redis, the copy this replica last loaded, which is what the
    sticky Gradio UI reads)."""

    backend: str
    ttl_s: float
    on_drop: list[Callable[[Session], None]]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Session]: ...

    def get(self, session_id: str) -> Session: ...

    def find(self, session_id: str) -> Session | None: ...

    def expires_in(self, session: Session) -> float: ...

    def resident_embeddings(self) -> list[Session]: ...

    async def create(self, client: str, image: np.ndarray, data: bytes | None = None
                     ) -> Session: ...

    async def load(self, session_id: str) -> Session: ...

    async def update(self, session_id: str, change: Callable[[Session], T]) -> T: ...

    async def remove(self, session_id: str) -> None: ...


def redis_password(config: AppConfig) -> str | None:
    """The password ``sessions.redis_password_env`` names, read from this replica's environment;
    a name that is not set fails the replica's start, saying which."""
    name = config.sessions.redis_password_env
    if name is None:
        return None
    password = os.environ.get(name)
    if not password:
        raise ValueError(f"sessions.redis_password_env is {name!r}, but no such environment "
                         "variable is set (or it is empty) in the Gateway's replica")
    return password


def build_store(config: AppConfig) -> SessionStore:
    """The session store ``sessions.backend`` names: this replica's memory, or Redis."""
    sessions = config.sessions
    if sessions.backend == "redis":
        return RedisSessionStore(
            sessions.redis_url, ttl_s=sessions.ttl_s, max_sessions=sessions.max_sessions,
            max_per_client=config.limits.max_sessions_per_client,
            max_history=sessions.max_history, prefix=sessions.redis_prefix,
            lock_timeout_s=sessions.lock_timeout_s, max_pixels=config.limits.max_pixels,
            password=redis_password(config),
        )
    return MemorySessionStore(
        ttl_s=sessions.ttl_s,
        max_sessions=sessions.max_sessions,
        max_per_client=config.limits.max_sessions_per_client,
    )
