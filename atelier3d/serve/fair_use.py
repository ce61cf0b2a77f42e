"""Fair use: who the client is, per-client token buckets on ``/v1``, and the active-job quota.

A client is its address (the first ``X-Forwarded-For`` hop when the config trusts the proxy in
front). Each request class (uploads, clicks, parses, job submissions, everything else) has its
own bucket per client, so one person's flood of edits never spends another's clicks, nor their
own clicks. Refusals are 429 with ``Retry-After`` (when the bucket has a token again), decided
before the body is read.

With ``sessions.backend: redis`` the buckets are in Redis (one Lua call per request, Redis's
clock), shared by every Gateway replica: N replicas give a client the configured rate, not N
times it. Keys: ``P:fair:<class>:<sha256(client)[:32]>`` (a client may be an API key), expiring
once the bucket has refilled. Should Redis be unreachable, each replica falls back to its own
buckets (logged) rather than refusing everyone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from atelier3d.config import FairUseSettings, RateLimit
from atelier3d.errors import TooManyRequests
from atelier3d.serve.auth import SCOPE_KEY
from atelier3d.serve.http import error_response

logger = logging.getLogger("ray.serve")

MAX_BUCKETS = 50_000  # past this, buckets that have refilled completely are dropped

# KEYS: the bucket; ARGV: per_s, burst -> '-1' when a token was spent, else the seconds until
# one is back (strings: Lua numbers would reach Python as integers).
_TAKE = """
local per_s, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * per_s)
local wait = -1
if tokens < 1 then wait = (1 - tokens) / per_s else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / per_s * 1000) + 1000)
return string.format('%.17g', wait)
"""


def request_class(method: str, path: str) -> str:
    """``uploads``, ``clicks``, ``parses``, ``jobs`` or ``reads``: a ``FairUseSettings`` field."""
    path = path.rstrip("/")
    if method == "POST":
        if path == "/v1/sessions":
            return "uploads"
        if path in ("/v1/jobs/edit", "/v1/jobs/mesh"):
            return "jobs"
        if path.startswith("/v1/sessions/"):
            return "parses" if path.endswith("/parse") else "clicks"
    return "reads"


def client_address(scope: Scope, trust_forwarded_for: bool) -> str:
    if trust_forwarded_for:
        for name, value in scope.get("headers") or []:
            if name == b"x-forwarded-for":
                first = value.decode("latin-1").split(",")[0].strip()
                if first:
                    return first
    client = scope.get("client")
    return client[0] if client else "unknown"


class FairUse:
    """The limits: buckets in this replica's memory, or in Redis (``redis``: an asyncio client)
    shared by every replica."""

    def __init__(self, settings: FairUseSettings,
                 clock: Callable[[], float] = time.monotonic, *, redis: Any = None,
                 prefix: str = "atelier3d") -> None:
        self.settings = settings
        self.clock = clock
        self.exempt_networks = [ipaddress.ip_network(n, strict=False) for n in settings.exempt]
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)
        self.redis = redis
        self.prefix = prefix
        self._take_shared = redis.register_script(_TAKE) if redis is not None else None

    def exempt(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in network for network in self.exempt_networks)

    def take(self, client: str, kind: str) -> float | None:
        """Spends one token of ``client``'s ``kind`` bucket: ``None`` when allowed, else the
        seconds until a token is back."""
        limit: RateLimit | None = getattr(self.settings, kind)
        if limit is None or self.exempt(client):
            return None
        now = self.clock()
        tokens, at = self.buckets.get((client, kind), (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - at) * limit.per_s)
        if tokens < 1.0:
            self.buckets[(client, kind)] = (tokens, now)
            return (1.0 - tokens) / limit.per_s
        self.buckets[(client, kind)] = (tokens - 1.0, now)
        if len(self.buckets) > MAX_BUCKETS:
            self._prune(now)
        return None

    async def take_shared(self, client: str, kind: str) -> float | None:
        """``take`` on the bucket every replica shares (Redis), where there is one."""
        limit: RateLimit | None = getattr(self.settings, kind)
        if self._take_shared is None or limit is None or self.exempt(client):
            return self.take(client, kind)
        digest = hashlib.sha256(client.encode()).hexdigest()[:32]
        try:
            wait = float(await self._take_shared(keys=[f"{self.prefix}:fair:{kind}:{digest}"],
                                                 args=[limit.per_s, limit.burst]))
        except Exception:  # noqa: BLE001 - Redis down: this replica's buckets, not a 500
            logger.warning("fair use: Redis unreachable; limiting with this replica's buckets",
                           exc_info=True)
            return self.take(client, kind)
        return None if wait < 0 else wait

    def _prune(self, now: float) -> None:
        for key, (tokens, at) in list(self.buckets.items()):
            limit = getattr(self.settings, key[1])
            if limit is None or tokens + (now - at) * limit.per_s >= limit.burst:
                del self.buckets[key]

    def check_active_jobs(self, client: str, active: int) -> None:
        """Raises 429 when ``client`` already has its quota of unfinished jobs."""
        quota = self.settings.max_active_jobs
        if quota is not None and active >= quota and not self.exempt(client):
            raise TooManyRequests(
                f"this client already has {active} edit/3D jobs queued or running (at most "
                f"{quota}); wait for one to finish or cancel one", retry_after_s=5.0)


class FairUseMiddleware:
    """Names the client (``request.state.client``) and applies ``FairUse`` to ``/v1``."""

    def __init__(self, app: ASGIApp, fair_use: FairUse) -> None:
        self.app = app
        self.fair_use = fair_use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # An API key names the client where keys are on (ApiKeyMiddleware runs first).
        client = scope.get(SCOPE_KEY) or client_address(
            scope, self.fair_use.settings.trust_forwarded_for)
        scope.setdefault("state", {})["client"] = client
        if scope["path"].startswith("/v1/"):
            kind = request_class(scope["method"], scope["path"])
            wait_s = await self.fair_use.take_shared(client, kind)
            if wait_s is not None:
                limit = getattr(self.fair_use.settings, kind)
                response = error_response(
                    429, TooManyRequests.code,
                    f"too many {kind} from this client (at most {limit.per_s:g}/s, bursts of "
                    f"{limit.burst}); retry in {max(1, math.ceil(wait_s))} s",
                    retry_after_s=wait_s)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
