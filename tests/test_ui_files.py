"""The files the UI offers for download, over real HTTP (the Gateway's route and cookie
middleware on a FastAPI app, no Ray): served to the browser that owns them, and with UI logins
to that user only; gone with their session."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image

from atelier3d.config import AppConfig
from atelier3d.serve.http import install_error_handlers
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.ui.common import ExportDir, UiState
from atelier3d.serve.ui.parse import ParseUi
from atelier3d.serve.ui.studio import EditUi, MeshRun
from atelier3d.serve.ui.workspace import COOKIE, UiCookieMiddleware, Workspaces, build_files_router

USER_HEADER = "x-test-ui-user"  # stands for the UI login's user (Gradio's own cookie in the app)


@pytest.fixture()
def served():
    service = SegmentService(AppConfig(), encoder=None, decoder=None)
    workspaces = Workspaces(service, ExportDir())
    app = FastAPI()
    install_error_handlers(app)

    def user_of(request: Request) -> str | None:
        return request.headers.get(USER_HEADER)

    app.include_router(build_files_router(workspaces, user_of))
    app.add_middleware(UiCookieMiddleware)
    with TestClient(app) as client:
        yield service, workspaces, client


def offer(service: SegmentService, workspaces: Workspaces, token: str, user: str | None):
    """A workspace of ``token`` with a session and a file offered in it."""
    workspace = workspaces.of(token, user)
    session = asyncio.run(service.store.create("ui:test", np.zeros((8, 8, 3), np.uint8)))
    workspace.ui.session_id = session.session_id
    (file,) = workspaces.exports.offer(workspace.ui, {"character-object1.png": b"\x89PNG data"})
    return session, file


def test_a_browser_gets_a_cookie_once(served) -> None:
    _, _, client = served
    first = client.get("/ui-files/none/x.png")
    assert first.status_code == 404 and first.json()["error"]["code"] == "not_found"
    cookie = first.cookies.get(COOKIE)
    assert cookie and len(cookie) >= 24
    assert "httponly" in first.headers["set-cookie"].lower()
    assert "samesite=lax" in first.headers["set-cookie"].lower()
    again = client.get("/ui-files/none/x.png")  # the client sends it back: no new one
    assert COOKIE not in again.cookies
    # /v1 is the API's: no UI cookie there.
    assert COOKIE not in TestClient(client.app).get("/v1/anything").cookies


def test_files_go_only_to_their_browser_and_user_and_go_with_the_session(served) -> None:
    service, workspaces, client = served
    client.cookies.set(COOKIE, "browser-a-token-0123456789")
    session, file = offer(service, workspaces, "browser-a-token-0123456789", None)
    url = f"/ui-files/{file.file_id}/{file.name}"
    mine = client.get(url)
    assert mine.status_code == 200 and mine.content == b"\x89PNG data"
    assert 'filename="character-object1.png"' in mine.headers["content-disposition"]
    assert "no-store" in mine.headers["cache-control"]
    # Another browser (another cookie), no cookie at all, or another name in the path: 404.
    stranger = TestClient(client.app)
    stranger.cookies.set(COOKIE, "browser-b-token-0123456789")
    assert stranger.get(url).status_code == 404
    assert TestClient(client.app).get(url).status_code == 404
    assert client.get(f"/ui-files/{file.file_id}/other.png").status_code == 404
    # The session ends: the file is no longer served, and no longer on disk.
    asyncio.run(service.store.remove(session.session_id))
    gone = client.get(url)
    assert gone.status_code == 404 and "/tmp" not in gone.text
    assert not file.path.exists()


def test_with_ui_logins_a_token_is_its_users_only(served) -> None:
    service, workspaces, client = served
    token = "shared-browser-token-0123456789"
    client.cookies.set(COOKIE, token)
    _, file = offer(service, workspaces, token, "alice")
    url = f"/ui-files/{file.file_id}/{file.name}"
    assert client.get(url, headers={USER_HEADER: "alice"}).status_code == 200
    # The same cookie signed in as another user (or signed out) finds nothing.
    assert client.get(url, headers={USER_HEADER: "bob"}).status_code == 404
    assert client.get(url).status_code == 404
    # Nor does bob get alice's workspace for that token: a new one, under a new token.
    bobs = workspaces.of(token, "bob")
    assert bobs.token != token and bobs.ui.offered == {}
    assert workspaces.of(token, "alice").ui.offered  # alice's is untouched


def test_a_page_used_before_its_load_event_keeps_its_work_and_downloads(served) -> None:
    """An upload right after the page shows runs before the page's load event has joined the
    page to its workspace: it works on the page's own state objects. Joining keeps those (with
    their session and downloads) rather than the workspace's empty ones, so the page's owner
    still gets its files, and a reload after that finds the work."""
    service, workspaces, client = served
    token = "quick-browser-token-0123456789"
    client.cookies.set(COOKIE, token)
    page_ui, page_parse, page_edit, page_mesh = UiState(), ParseUi(), EditUi(), MeshRun()
    session = asyncio.run(service.store.create("ui:test", np.zeros((8, 8, 3), np.uint8)))
    page_ui.session_id = session.session_id  # the upload, done before the load event ran
    (file,) = workspaces.exports.offer(page_ui, {"character-object1.png": b"\x89PNG data"})

    workspace = workspaces.of(token, None)
    assert not workspaces.join(workspace, page_ui, page_parse, page_edit, page_mesh)
    assert workspace.ui is page_ui and workspace.mesh is page_mesh
    assert client.get(f"/ui-files/{file.file_id}/{file.name}").status_code == 200

    # A reload: a new page, with new, unused state objects, gets the work put into them.
    again_ui, again_parse, again_edit, again_mesh = UiState(), ParseUi(), EditUi(), MeshRun()
    assert workspaces.join(workspaces.of(token, None), again_ui, again_parse, again_edit,
                           again_mesh)
    assert again_ui.session_id == session.session_id and again_ui.reloaded
    assert again_ui.lock is not page_ui.lock  # the page's own lock, which its events hold
    assert client.get(f"/ui-files/{file.file_id}/{file.name}").status_code == 200
    # Files the new page offers are its browser's too.
    (second,) = workspaces.exports.offer(again_ui, {"character-object2.png": b"\x89PNG 2"})
    assert client.get(f"/ui-files/{second.file_id}/{second.name}").status_code == 200



def test_a_picture_shown_again_is_never_rewritten() -> None:
    """The overlay of a step shown again (undo back to it, another object chosen) has the same
    bytes: its file is left as it is (a browser may be reading it), never written over."""
    exports = ExportDir()
    rows, cols = np.mgrid[0:120, 0:90]
    image = np.stack([rows * 2, cols * 2, rows + cols], axis=-1).astype(np.uint8)
    first = Path(exports.picture(image, "overlay"))
    written = first.stat()
    again = Path(exports.picture(image, "overlay"))
    assert again == first
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    shown = np.asarray(Image.open(first).convert("RGB")).astype(int)
    assert shown.shape == image.shape and np.abs(shown - image).mean() < 4  # lossy WebP
    assert exports.picture(image[::-1].copy(), "overlay") != str(first)
    assert not list(first.parent.glob(".*"))  # no staging file left behind
