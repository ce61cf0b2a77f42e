"""What ties a browser to its work across reloads: a workspace per browser, named by a cookie.

A Gradio tab's ``gr.State`` lives as long as the page: a reload starts with new, empty state
while the session, its parses and its jobs go on on the server. So the tabs' states (the
Segment tab's ``UiState``, the parse shown, the edits, the 3D job) are kept here, by a random
token that :class:`UiCookieMiddleware` gives each browser in an HttpOnly cookie, and the page's
load event puts them back, into the page's own state objects (:meth:`Workspaces.join`). A
workspace is its browser's, and, with UI logins on, its user's: a token presented by another
signed-in user finds nothing. It ends with its session (or after the session TTL unused), and
with it the files it offered for download, which :func:`build_files_router` serves only to
that browser (and user).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from http.cookies import SimpleCookie

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier3d.errors import NotFound
from atelier3d.serve.auth import api_path
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import Session
from atelier3d.serve.ui.common import FILES_ROUTE, ExportDir, OfferedFile, UiState
from atelier3d.serve.ui.parse import ParseUi
from atelier3d.serve.ui.studio import EditUi, MeshRun

COOKIE = "atelier3d_ui"
GONE = "This file is no longer offered: it went with its session (or belongs to another browser)."


@dataclass
class Workspace:
    """One browser's tabs' states."""

    token: str
    user: str | None  # the UI login's user name, when logins are on
    ui: UiState = field(default_factory=UiState)
    parse: ParseUi = field(default_factory=ParseUi)
    edit: EditUi = field(default_factory=EditUi)
    mesh: MeshRun = field(default_factory=MeshRun)
    last_used: float = field(default_factory=time.monotonic)


class Workspaces:
    """The workspaces of this Gateway replica (the Gradio UI needs sticky routing anyway)."""

    def __init__(self, service: SegmentService, exports: ExportDir) -> None:
        self.service = service
        self.exports = exports
        self.ttl_s = service.config.sessions.ttl_s
        self.by_token: dict[str, Workspace] = {}
        service.store.on_drop.append(self._session_gone)

    def of(self, token: str | None, user: str | None) -> Workspace:
        """The workspace of ``token``; a new one (under a new token if ``token`` is another
        user's or missing, so nothing of it is shared)."""
        self._prune()
        found = self.by_token.get(token) if token else None
        if found is not None and found.user == user:
            found.last_used = time.monotonic()
            return found
        if token is None or found is not None:
            token = secrets.token_urlsafe(18)
        workspace = Workspace(token, user)
        self.by_token[token] = workspace
        return workspace

    def join(self, workspace: Workspace, ui: UiState, parse: ParseUi, edit: EditUi,
             mesh: MeshRun) -> bool:
        """Makes a loading page's own state objects ``workspace``'s; returns whether the page
        has work to show again (it was reloaded).

        The page's objects are kept, never swapped for the workspace's: an event the page
        started before its load event ran (an upload right after the page showed) holds them,
        and its result, written back into the page's state, would replace the workspace's
        objects there, leaving the workspace without the work (and its downloads answering 404
        to their owner). Unless the page has work of its own by then, the workspace's is put
        into its objects (shallow copies: the offered files stay one dict)."""
        page = (ui, parse, edit, mesh)
        used = ui.session_id is not None or mesh.job_id is not None
        kept = (workspace.ui, workspace.parse, workspace.edit, workspace.mesh)
        if used:
            if workspace.ui is not ui:  # replaced by what the page did meanwhile
                self.exports.drop(workspace.ui)
        else:
            for old, new in zip(kept, page, strict=True):
                if old is not new:
                    _copy_into(old, new)
        workspace.ui, workspace.parse, workspace.edit, workspace.mesh = page
        ui.reloaded = not used and (ui.session_id is not None or mesh.job_id is not None)
        return ui.reloaded

    def offered(self, token: str | None, user: str | None, file_id: str) -> OfferedFile:
        """A file offered to the browser of ``token`` (and ``user``), while its session lasts."""
        workspace = self.by_token.get(token) if token else None
        if workspace is None or workspace.user != user:
            raise NotFound(GONE)
        file = workspace.ui.offered.get(file_id)
        if file is None or not file.path.is_file() or (
                file.session_id is not None and self.service.store.find(file.session_id) is None):
            raise NotFound(GONE)
        return file

    def _session_gone(self, session: Session) -> None:
        for workspace in self.by_token.values():
            self.exports.drop(workspace.ui, session.session_id)

    def _prune(self) -> None:
        """Workspaces unused for the session TTL: their sessions have expired too."""
        cutoff = time.monotonic() - self.ttl_s
        for token, workspace in list(self.by_token.items()):
            if workspace.last_used < cutoff:
                del self.by_token[token]
                self.exports.drop(workspace.ui)


def _copy_into(source: object, target: object) -> None:
    """``source``'s fields into ``target``, but its lock: ``target``'s events hold their own."""
    for name in (f.name for f in fields(source)):  # type: ignore[arg-type]
        if name != "lock":
            setattr(target, name, getattr(source, name))


def cookie_token(headers: list[tuple[bytes, bytes]] | dict) -> str | None:
    """The workspace token in a request's cookies."""
    raw = headers.get("cookie") if isinstance(headers, dict) else next(
        (value.decode("latin-1") for name, value in headers if name == b"cookie"), None)
    if not raw:
        return None
    morsel = SimpleCookie()
    try:
        morsel.load(raw)
    except Exception:  # noqa: BLE001 - a malformed cookie header is a browser without a token
        return None
    found = morsel.get(COOKIE)
    return found.value if found is not None else None


class UiCookieMiddleware:
    """Gives every browser that loads the UI (any path but ``/v1``) a workspace token in an
    HttpOnly, SameSite=Lax cookie, once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or api_path(scope) \
                or cookie_token(scope.get("headers") or []) is not None:
            await self.app(scope, receive, send)
            return
        cookie = (f"{COOKIE}={secrets.token_urlsafe(18)}; Path=/; HttpOnly; SameSite=Lax"
                  ).encode("latin-1")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message,
                           "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def build_files_router(workspaces: Workspaces,
                       user_of: Callable[[Request], str | None]) -> APIRouter:
    """``GET /ui-files/{file_id}/{name}``: a file the UI offered, to its browser (and user)."""
    router = APIRouter()

    @router.get(FILES_ROUTE + "/{file_id}/{name}", include_in_schema=False)
    async def offered_file(file_id: str, name: str, request: Request) -> FileResponse:
        file = workspaces.offered(request.cookies.get(COOKIE), user_of(request), file_id)
        if name != file.name:
            raise NotFound(GONE)
        return FileResponse(file.path, filename=file.name,
                            headers={"Cache-Control": "private, no-store"})

    return router
