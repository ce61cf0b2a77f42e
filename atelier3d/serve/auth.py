"""Optional API keys for ``/v1``, per-key ownership of what a key creates, and the UI's login.

Keys are kept as SHA-256 digests only and compared with ``hmac.compare_digest`` against every
configured digest (no early exit), so neither the keys nor their number leak through timing.
The key that authenticated a request becomes its client identity (``key:`` and the first 16 hex
digits of its digest): sessions and jobs record it when they are made, and a lookup by another
identity is a 404, the same answer as for an id that does not exist.

The identity travels in a context variable set by :class:`ApiKeyMiddleware` for the request, so
the session store and job service check ownership wherever an id is looked up, without every
service method taking the caller as an argument. Outside ``/v1`` requests (the Gradio UI, which
calls the services in-process) and without keys, nothing is checked: ids are capabilities.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from contextvars import ContextVar
from pathlib import Path

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from atelier3d.config import AuthSettings
from atelier3d.serve.http import error_response

logger = logging.getLogger("ray.serve")

MIN_KEY_LENGTH = 16

SCOPE_KEY = "atelier3d.client"  # the request's client identity, in the ASGI scope

_HEX_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")

# The identity of the /v1 request being served; None: nothing to check.
current_client: ContextVar[str | None] = ContextVar("atelier3d_client", default=None)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def stored_digest(entry: str, what: str = "API key") -> str:
    """The digest of a configured secret: given as ``sha256:<hex>``, or the secret itself."""
    entry = entry.strip()
    match = _HEX_DIGEST.match(entry)
    if match:
        return match.group(1).lower()
    if what == "API key" and len(entry) < MIN_KEY_LENGTH:
        raise ValueError(f"an API key must have at least {MIN_KEY_LENGTH} characters "
                         "(or be given as sha256:<hex>)")
    if not entry:
        raise ValueError(f"an empty {what} is not allowed")
    return digest(entry)


def load_key_digests(settings: AuthSettings) -> list[str]:
    entries = list(settings.api_keys)
    if settings.api_keys_file:
        for line in Path(settings.api_keys_file).expanduser().read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    if settings.api_keys_env:
        value = os.environ.get(settings.api_keys_env)
        if value is None:
            raise ValueError(f"auth.api_keys_env names ${settings.api_keys_env}, which is not set")
        entries.extend(part for part in value.split(",") if part.strip())
    return sorted({stored_digest(entry) for entry in entries})


class KeyRing:
    """The accepted API keys, as digests."""

    def __init__(self, settings: AuthSettings) -> None:
        self.digests = load_key_digests(settings)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def identify(self, key: str) -> str | None:
        """The client identity of ``key``, or None if it is not one of ours."""
        presented = digest(key).encode()
        found = None
        for known in self.digests:
            if hmac.compare_digest(presented, known.encode()):
                found = known
        return f"key:{found[:16]}" if found is not None else None


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def api_path(scope: Scope) -> bool:
    """Whether the request is for ``/v1`` (behind whatever prefix the app is mounted at)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == "/v1" or path.startswith("/v1/")


class ApiKeyMiddleware:
    """401 for a ``/v1`` request without a valid ``Authorization: Bearer <key>``; otherwise the
    key's identity is the request's client (``client_key``) and the owner it is checked as."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not api_path(scope):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        client = self.keys.identify(token) if token is not None else None
        if client is None:
            why = "invalid API key" if token is not None else "missing API key"
            response = error_response(
                401, "unauthorized", f"{why}: send the header 'Authorization: Bearer <key>'")
            response.headers["WWW-Authenticate"] = 'Bearer realm="atelier3d"'
            await response(scope, receive, send)
            return
        scope[SCOPE_KEY] = client
        reset = current_client.set(client)
        try:
            await self.app(scope, receive, send)
        finally:
            current_client.reset(reset)


def visible(owner: str) -> bool:
    """Whether what ``owner`` made may be seen by the request being served."""
    client = current_client.get()
    return client is None or hmac.compare_digest(client.encode(), owner.encode())


def ui_login(users: dict[str, str]):
    """Gradio's ``auth`` callable for ``auth.ui_users`` (None when there are none)."""
    if not users:
        return None
    digests = {name: stored_digest(secret, "UI password") for name, secret in users.items()}
    decoy = digest("no such user")

    def check(username: str, password: str) -> bool:
        known = digests.get(username)
        ok = hmac.compare_digest(digest(password or "").encode(), (known or decoy).encode())
        return ok and known is not None

    return check


def client_key(request: Request) -> str:
    """Who the client is: its API key's identity when keys are on, else its address as
    ``FairUseMiddleware`` named it (the proxy's X-Forwarded-For where trusted)."""
    identity = request.scope.get(SCOPE_KEY) or getattr(request.state, "client", None)
    if identity:
        return identity
    return request.client.host if request.client else "unknown"
