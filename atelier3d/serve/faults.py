"""Surviving a lost model replica (killed, crashed, its node gone): what the Gateway retries.

Ray Serve replaces a dead replica, but a request that was on it fails with an actor error. Model
calls that change nothing (encode, decode, parse) are simply made again, on whichever replica
the router picks, once; if that fails too the client gets a 503 with Retry-After, which the
clients retry. Jobs are re-run by the job service (``jobs.max_attempts``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import ray.exceptions

from atelier3d.errors import Unavailable

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# ActorDiedError and ActorUnavailableError are RayActorErrors; a worker or node crash can also
# surface on its own. OwnerDiedError: the replica that held an object another one was reading
# (a split mesh job's surfaces, on Shape3D) is gone.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError, ray.exceptions.OwnerDiedError)
RETRY_AFTER_S = 2.0  # about what Serve takes to route around a dead replica


def replica_lost(exc: BaseException) -> bool:
    return isinstance(exc, REPLICA_LOST)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


async def call_idempotent(call: Callable[[], Awaitable[T]], what: str, attempts: int = 2) -> T:
    """``await call()``, made again when its replica was lost; then 503 + Retry-After."""
    for attempt in range(1, attempts):
        try:
            return await call()
        except REPLICA_LOST as exc:
            logger.warning("%s: replica lost (%s), attempt %d of %d", what, describe(exc),
                           attempt, attempts)
    try:
        return await call()
    except REPLICA_LOST as exc:
        raise Unavailable(f"{what}: a model replica was lost; retry shortly",
                          retry_after_s=RETRY_AFTER_S) from exc
