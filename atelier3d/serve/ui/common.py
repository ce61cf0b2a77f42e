"""What every tab of the UI shares: the Segment tab's state, guarded handlers, the image upload,
and the files offered for download."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import html
import inspect
import io
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr
import numpy as np
from PIL import Image
from pydantic import ValidationError

from atelier3d import samples
from atelier3d.errors import ApiError, validation_message

# One colour per object, in creation order (cycled).
logger = logging.getLogger("ray.serve")

COLOURS = [(30, 144, 255), (255, 99, 71), (60, 200, 60), (238, 130, 238), (255, 200, 0),
           (0, 206, 209)]

POLL_S = 0.2  # how often the encode progress bar is refreshed

EXPORT_TTL_S = 3600.0  # exported files are Gradio-cached copies; our originals go after this
PICTURE_TTL_S = 600.0  # shown pictures: Gradio copies each as soon as it is returned

# Options every event of every tab shares (why: see ``events`` in build_ui).
EVENTS: dict[str, Any] = {"concurrency_limit": None, "api_visibility": "private"}


@dataclass
class UiState:
    """One browser tab's handle on its server-side session.

    Gradio hands every event of a tab this same object (state is not copied per event), so it is
    changed in place, and ``lock`` makes the tab's events run one after another: a click reads the
    object's prompts, extends them and records the result, and two at once would lose one.
    """

    session_id: str | None = None
    image: np.ndarray | None = None
    objects: list[str] = field(default_factory=list)  # object ids, in creation order
    object_id: str | None = None
    corner: tuple[float, float] | None = None  # first click of a box in "box corner" mode
    image_name: str = "image"  # the uploaded file's name without suffix: names the downloads
    too_big: UploadedFile | None = None  # an upload over the pixel limit, offered to downscale
    # The upload was cleared by a refusal: its change event (empty) must not forget a session
    # opened meanwhile (the downscaled image, when that event comes late).
    clearing_upload: bool = False
    # Set by the page's load event: whether this workspace had a session then, so the tabs have
    # something to show again (and nothing to redo when the page is new).
    reloaded: bool = False
    # What this tab offers for download, by file id (served by ``ui.workspace``'s route to
    # the browser that owns it, while the session lasts).
    offered: dict[str, OfferedFile] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    def start(self, session_id: str | None, image: np.ndarray | None,
              object_id: str | None) -> None:
        self.session_id, self.image, self.corner = session_id, image, None
        self.objects = [object_id] if object_id else []
        self.object_id = object_id

    def file_stem(self, what: str) -> str:
        """How a download is named: the image, then what it is (``character-object1``)."""
        return f"{self.image_name}-{what}".lower().replace(" ", "")

    def colour(self, object_id: str) -> tuple[int, int, int]:
        return COLOURS[self.objects.index(object_id) % len(COLOURS)]

    def label(self, object_id: str) -> str:
        return f"Object {self.objects.index(object_id) + 1}"


def _skip(_: UiState | None = None) -> dict:
    return gr.skip()


def sentence(message: str) -> str:
    """An API error message as the UI shows it: a sentence (capital first, full stop last)."""
    message = message.strip()
    if not message:
        return message
    message = message[0].upper() + message[1:]
    return message if message.endswith((".", "!", "?", ")")) else message + "."


def _report(name: str, exc: Exception) -> None:
    """Shows a handler's error as a warning toast: ``ApiError``s carry a message meant for users
    (the same the API answers with its 4xx); anything else is logged and reported generically,
    so no path or internal name reaches the page."""
    if isinstance(exc, ApiError):
        gr.Warning(sentence(exc.message))
    elif isinstance(exc, ValidationError):
        gr.Warning(sentence(validation_message(exc.errors())))
    else:
        logger.error("UI handler %s failed", name, exc_info=exc)
        gr.Warning("Something went wrong on the server; please try again.")


def guarded(fallback: Callable[[UiState | None], Any] = _skip, lock: bool = True):
    """Runs a handler (a coroutine, or an async generator of updates) under its tab's lock and
    turns errors into a warning toast.

    The outputs are then left as they were (``gr.skip()``) unless a fallback, given the tab's
    state, says otherwise. Handlers that follow a job for minutes take no lock (``lock=False``):
    the tab's other events, its Cancel button among them, must not wait for them.
    ``functools.wraps`` keeps the signature Gradio inspects for ``gr.Progress``, ``gr.Request``
    and ``gr.SelectData`` parameters.
    """

    def held(args: tuple) -> tuple[UiState | None, contextlib.AbstractAsyncContextManager]:
        ui = next((arg for arg in args if isinstance(arg, UiState)), None)
        return ui, ui.lock if lock and ui is not None else contextlib.nullcontext()

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                ui, guard = held(args)
                async with guard:
                    try:
                        async for update in fn(*args, **kwargs):
                            yield update
                    except Exception as exc:
                        _report(fn.__name__, exc)
                        yield fallback(ui)

            return stream

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            ui, guard = held(args)
            async with guard:
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    _report(fn.__name__, exc)
                return fallback(ui)

        return wrapper

    return decorate


class ExportDir:
    """A private temp folder for examples and exports.

    Gradio copies returned files into its own cache (cleaned by ``delete_cache``), so each export
    gets a fresh sub-folder (names stay readable, users never share a file) that is pruned later.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="atelier3d-ui-"))
        self._pictures_pruned = 0.0

    def write(self, files: dict[str, bytes], prefix: str = "export-") -> list[str]:
        self._prune()
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix=prefix))
        paths = []
        for name, data in files.items():
            path = folder / name
            path.write_bytes(data)
            paths.append(str(path))
        return paths

    def offer(self, ui: UiState, files: dict[str, bytes]) -> list[OfferedFile]:
        """Writes ``files`` and lists them as offered by ``ui``'s tab, for its session."""
        offered = []
        # Not pruned by age as exports are: they go with their session (``drop``).
        for name, path in zip(files, self.write(files, prefix="offer-"), strict=True):
            file = OfferedFile(secrets.token_urlsafe(18), ui.session_id, name, Path(path))
            ui.offered[file.file_id] = file
            offered.append(file)
        return offered

    def drop(self, ui: UiState, session_id: str | None = None) -> None:
        """Forgets (and deletes) what ``ui`` offered of ``session_id``, which has gone (of every
        session, and of none, without it)."""
        for file_id, file in list(ui.offered.items()):
            if session_id is None or file.session_id == session_id:
                del ui.offered[file_id]
                shutil.rmtree(file.path.parent, ignore_errors=True)

    def picture(self, image: np.ndarray, name: str) -> str:
        """``image`` as a WebP file to show (what Gradio does with an array, but written under a
        temporary name and renamed into place). Gradio writes an array's encoding over the file of
        the same content in place, so a browser (or test) fetching a picture that is shown again
        at that moment could read it truncated; files are copied into its cache atomically."""
        with io.BytesIO() as out:
            # method 0: a third of the default's encode time (a render per click) for ~25% more
            # bytes, which a page on the server's network fetches in no time.
            Image.fromarray(image).save(out, "webp", method=0)
            data = out.getvalue()
        folder = self.root / "pictures" / hashlib.sha256(data).hexdigest()[:32]
        path = folder / f"{name}.webp"
        if path.exists():
            with contextlib.suppress(FileNotFoundError):  # pruned meanwhile: written again
                os.utime(folder)  # shown again: pruned on the schedule of its last use
                return str(path)
        folder.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(staging, path)
        self._prune_pictures()
        return str(path)

    def _prune(self) -> None:
        cutoff = time.time() - EXPORT_TTL_S
        for folder in self.root.glob("export-*"):
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)

    def _prune_pictures(self) -> None:
        now = time.time()
        if now - self._pictures_pruned < PICTURE_TTL_S / 10:  # a glob per picture would cost
            return
        self._pictures_pruned = now
        for folder in (self.root / "pictures").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if folder.stat().st_mtime < now - PICTURE_TTL_S:
                    shutil.rmtree(folder, ignore_errors=True)

    def examples(self) -> list[tuple[str, str]]:
        """(caption, PNG path) of every sample image: the UI offers them as files."""
        folder = self.root / "examples"
        folder.mkdir(exist_ok=True)
        out = []
        for example in samples.examples():
            path = folder / f"{example.name}.png"
            Image.fromarray(example.image).save(path)
            out.append((example.caption, str(path)))
        return out


@dataclass
class OfferedFile:
    """A file the UI offers for download: its own random id, the session it belongs to (it goes
    with it), the name it downloads as, and where it lies."""

    file_id: str
    session_id: str | None  # None: a 3D asset of an uploaded image, made outside any session
    name: str
    path: Path

    @property
    def url(self) -> str:
        # Relative to the page, so the UI works behind a path prefix too.
        return f"{FILES_ROUTE.lstrip('/')}/{self.file_id}/{quote(self.name)}"


FILES_ROUTE = "/ui-files"  # where ``ui.workspace`` serves the offered files


def links(files: list[OfferedFile], label: str) -> dict:
    """The update showing ``files`` as download links (an HTML list, hidden when empty)."""
    if not files:
        return gr.update(value="", visible=False)
    items = "".join(f'<li><a href="{html.escape(f.url)}" download="{html.escape(f.name)}">'
                    f"{html.escape(f.name)}</a></li>" for f in files)
    return gr.update(value=f'<div class="downloads"><strong>{html.escape(label)}</strong>'
                           f"<ul>{items}</ul></div>", visible=True)


def hidden_links() -> dict:
    return links([], "")


def legend(entries: list[tuple[str, tuple[int, int, int]]], current: str | None = None) -> str:
    """Names, each after a square of the exact colour an overlay draws it in (HTML); the name
    ``current`` is marked as the one being worked on."""
    swatches = []
    for name, (r, g, b) in entries:
        marked = ' aria-current="true"' if name == current else ""
        swatches.append(
            f'<span class="swatch"{marked}><span aria-hidden="true" style="background: '
            f"rgb({r},{g},{b}); display: inline-block; width: 0.9em; height: 0.9em; "
            f'border: 1px solid #888; vertical-align: middle"></span> {html.escape(name)}</span>'
        )
    return " &nbsp; ".join(swatches)


@dataclass
class UploadedFile:
    """An upload as it arrived: the server's decoder reads it, not Gradio's."""

    path: str | None
    name: str
    data_url: str | None = None

    def read(self) -> bytes:
        if self.data_url is not None:  # a pasted image comes as a data: URL
            return base64.b64decode(self.data_url.partition(",")[2] or "")
        return Path(self.path).read_bytes()

    @property
    def stem(self) -> str:
        stem = Path(self.name).stem or "image"
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40] or "image"


def uploaded_file(payload: dict | None) -> UploadedFile | None:
    """An image upload as an event with ``preprocess=False`` gets it (Gradio's ``ImageData`` as
    a dict), undecoded: the server decodes it as ``/v1`` does, with its limits and its plain 4xx
    messages, where Gradio's own decoding shows its exception text (with the server's file path)
    for a file that is not an image, and a bare "Error" for a truncated one."""
    if not payload:
        return None
    name = payload.get("orig_name") or "image"
    url = payload.get("url") or ""
    if url.startswith("data:"):
        return UploadedFile(None, name, data_url=url)
    if not payload.get("path"):
        return None
    return UploadedFile(payload["path"], name)


@dataclass
class Restore:
    """What a tab shows again after a reload: ``fn(*inputs)`` (a guarded handler) gives
    ``outputs``; run once the page's load event has put the workspace's states back."""

    fn: Callable[..., Any]
    inputs: list[Any]
    outputs: list[Any]
    progress_on: list[Any] | None = None  # where its progress shows (None: every output)


def client_key(request: gr.Request | None) -> str:
    """Per-user (with the UI login) or per-address session quota, like the /v1 API's, not one
    quota shared by every UI user."""
    user = getattr(request, "username", None)
    if user:
        return f"ui-user:{user}"
    host = getattr(getattr(request, "client", None), "host", None)
    return f"ui:{host or 'unknown'}"


async def with_progress(work: Awaitable[Any], fraction: Callable[[], float],
                        progress: gr.Progress, desc: str) -> Any:
    """Awaits ``work`` while showing ``fraction()`` (0..1) as its progress; returns its result."""
    waiter = asyncio.ensure_future(work)
    try:
        while not waiter.done():
            progress(fraction(), desc=desc)
            await asyncio.wait({waiter}, timeout=POLL_S)
        return await waiter
    finally:
        waiter.cancel()


# The session id in the Segment tab's view (its hidden #segment-state JSON), read in the page:
# the gate's handler then runs when an image comes or goes, not on every click.
_SESSION_OF_VIEW = "(view) => { try { return JSON.parse(view).session_id ?? ''; } " \
                   "catch { return ''; } }"


class ImageGate:
    """The buttons that need an image: not clickable until the Segment tab has one (or the
    tab's own upload has one, for a tab that takes its own), and not again once it is cleared
    or refused. Their handlers still check, as a click can come before the update."""

    def __init__(self, state: gr.State) -> None:
        self.state = state  # the Segment tab's UiState
        self.gated: list[tuple[gr.Button, gr.Image | None]] = []
        self.view: gr.Textbox | None = None

    def follows(self, view: gr.Textbox) -> None:
        """The Segment tab's hidden view of its object (JSON with its session id; "{}"
        without an image)."""
        self.view = view

    def needs_image(self, *buttons: gr.Button, own: gr.Image | None = None) -> None:
        """``buttons`` (made with ``interactive=False``) need the Segment tab's image, or
        ``own``'s upload."""
        self.gated += [(button, own) for button in buttons]

    def link(self) -> None:
        """Once every tab is built: follows the Segment tab's view and the tabs' own uploads."""
        view = self.view
        if view is None:
            raise RuntimeError("the Segment tab did not give the gate its view")
        owns = [own for own in dict.fromkeys(own for _, own in self.gated) if own is not None]
        session = gr.Textbox("", elem_classes=["a3d-hidden"], elem_id="segment-session")
        view.change(None, [view], [session], js=_SESSION_OF_VIEW, **EVENTS)

        @guarded()
        async def on_image(ui: UiState, *uploads: dict | None) -> list[dict]:
            segmented = ui.session_id is not None and ui.object_id is not None
            has = {id(own): uploaded_file(upload) is not None
                   for own, upload in zip(owns, uploads, strict=True)}
            return [gr.update(interactive=segmented or (own is not None and has[id(own)]))
                    for _, own in self.gated]

        for trigger in (session, *owns):
            trigger.change(on_image, [self.state, *owns], [button for button, _ in self.gated],
                           **EVENTS, show_progress="hidden", preprocess=False)
