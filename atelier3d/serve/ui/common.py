"""What every tab of the UI shares: the Segment tab's state, guarded handlers, exports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    def start(self, session_id: str | None, image: np.ndarray | None,
              object_id: str | None) -> None:
        self.session_id, self.image, self.corner = session_id, image, None
        self.objects = [object_id] if object_id else []
        self.object_id = object_id

    def colour(self, object_id: str) -> tuple[int, int, int]:
        return COLOURS[self.objects.index(object_id) % len(COLOURS)]

    def label(self, object_id: str) -> str:
        return f"Object {self.objects.index(object_id) + 1}"


def _skip(_: UiState | None = None) -> dict:
    return gr.skip()


def _report(name: str, exc: Exception) -> None:
    """Shows a handler's error as a warning toast: ``ApiError``s carry a message meant for users;
    anything else is logged and reported generically."""
    if isinstance(exc, ApiError):
        gr.Warning(exc.message)
    elif isinstance(exc, ValidationError):
        gr.Warning(validation_message(exc.errors()))
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

    def write(self, files: dict[str, bytes]) -> list[str]:
        self._prune()
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix="export-"))
        paths = []
        for name, data in files.items():
            path = folder / name
            path.write_bytes(data)
            paths.append(str(path))
        return paths

    def _prune(self) -> None:
        cutoff = time.time() - EXPORT_TTL_S
        for folder in self.root.glob("export-*"):
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)

    def examples(self) -> list[tuple[str, str]]:
        """(label, PNG path) of every sample image; gr.Examples wants files."""
        folder = self.root / "examples"
        folder.mkdir(exist_ok=True)
        out = []
        for name, image in samples.examples().items():
            path = folder / f"{name.split(' ')[0]}.png"
            Image.fromarray(image).save(path)
            out.append((name, str(path)))
        return out


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
