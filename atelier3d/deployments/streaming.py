"""Long model calls as streams of progress events, for the job-running deployments.

A diffusion pipeline is one blocking call that reports progress through a callback. The replica
runs it in a worker thread and streams what the callback reports as plain dicts (the Gateway reads
them with ``handle.options(stream=True)``):

- ``{"type": "progress", "stage": str, "step": int, "total": int}``: step ``step`` of ``total`` of
  ``stage`` is done (stages such as ``conditioning``, ``denoise``, ``decode``); with ``"part"``
  and ``"parts"`` where the job makes several things (the parts of a layered mesh);
- ``{"type": "artifact", "name": str, "media_type": str, "data": bytes, "meta": dict}``: an
  intermediate result worth sending at once (the untextured mesh before the textured one);
- ``{"type": "result", "media_type": str, "data": bytes, "meta": dict}``: the last event.

Cancelling the stream (the Gateway cancels the Serve request) sets the job's cancel flag; the
next progress report raises ``JobCancelled`` inside the worker thread, so the pipeline stops at
its next step. Pipeline objects keep per-call state (schedulers, ``_interrupt``), so calls on one
object are serialised with ``lock``: a request that arrives while a cancelled one is still
finishing its current step waits for it instead of corrupting it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from atelier3d.config import AppConfig
from atelier3d.deployments.user_config import TorchUserConfig
from atelier3d.metrics import report_gpu_memory
from atelier3d.pull_status import wait_for_weights

logger = logging.getLogger("ray.serve")


class JobCancelled(Exception):
    """Raised inside the worker thread at the first progress report after a cancel."""


class ProgressReporter:
    """Handed to the blocking function: ``report(stage, step, total)`` and ``artifact(...)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue,
                 cancelled: threading.Event) -> None:
        self._loop, self._events, self._cancelled = loop, events, cancelled

    def _put(self, event: dict) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled()

    def report(self, stage: str, step: int, total: int, part: int | None = None,
               parts: int | None = None) -> None:
        self.check_cancelled()
        event = {"type": "progress", "stage": stage, "step": step, "total": total}
        if parts is not None:
            event.update(part=part, parts=parts)
        self._put(event)

    def artifact(self, name: str, media_type: str, data: bytes, meta: dict | None = None) -> None:
        self.check_cancelled()
        self._put({"type": "artifact", "name": name, "media_type": media_type, "data": data,
                   "meta": meta or {}})


_DONE = object()


async def stream_blocking(
    work: Callable[[ProgressReporter], dict[str, Any]], lock: threading.Lock
) -> AsyncIterator[dict]:
    """Runs ``work(reporter)`` in a thread under ``lock`` and yields its events as they come.

    ``work`` returns the result event's fields (``media_type``, ``data``, ``meta``); its
    exceptions (``ApiError``s for bad input) are raised here, after the events before them.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    reporter = ProgressReporter(loop, events, cancelled)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with lock:
                reporter.check_cancelled()  # cancelled while waiting for the previous call
                outcome["result"] = work(reporter)
        except BaseException as exc:  # re-raised in the event loop below
            outcome["error"] = exc
        finally:
            loop.call_soon_threadsafe(events.put_nowait, _DONE)

    worker = threading.Thread(target=run, name="job-worker", daemon=True)
    worker.start()
    try:
        while (event := await events.get()) is not _DONE:
            yield event
    finally:
        # Reached on completion and on cancellation (the Serve request's task is cancelled):
        # the thread then stops at its next report and releases the lock.
        cancelled.set()
    if "error" in outcome:
        raise outcome["error"]
    yield {"type": "result", **outcome["result"]}


class JobModel:
    """What a job-running deployment (ImageEditor, Shape3D) shares: torch threads from its
    ``user_config``, one pipeline call at a time (a lock), and the call's events streamed."""

    memory_label: str  # how report_gpu_memory names the deployment
    weights: tuple[str, ...]  # the models it loads, as a pull names them (pull_status)

    def __init__(self, config: dict) -> None:
        self._lock = threading.Lock()
        self.reconfigure({})  # usable without a user_config (and in-process, without Serve)
        cfg = AppConfig.model_validate(config)
        wait_for_weights(cfg.cache_path, self.weights)  # a pull beside the server
        described = self.load(cfg)
        logger.info("%s ready: %s", type(self).__name__, described)

    def load(self, cfg: AppConfig) -> str:
        """Loads the model; says what was loaded (name, device, trained or not, options)."""
        raise NotImplementedError

    def reconfigure(self, user_config: dict) -> None:
        TorchUserConfig.model_validate(user_config or {}).apply_threads()

    async def stream(self, work: Callable[[ProgressReporter], dict[str, Any]]
                     ) -> AsyncIterator[dict]:
        """``work``'s events (see :func:`stream_blocking`), under this replica's lock.

        Closing this stream (a cancelled job) closes the inner one at once, which stops the
        pipeline at its next step and frees the lock, instead of whenever it is collected; the
        caller closes this one the same way (``aclosing``).
        """
        async with aclosing(stream_blocking(work, self._lock)) as events:
            async for event in events:
                yield event
        report_gpu_memory(self.memory_label)
