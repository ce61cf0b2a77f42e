"""Admission of one kind's jobs: at most ``max_running`` at once, the rest wait in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from atelier3d.config import JobKindSettings
from atelier3d.errors import Unavailable
from atelier3d.serve.jobs.types import Job


class KindQueue:
    """FIFO admission for one kind: at most ``max_running`` at once, the rest in order."""

    def __init__(self, settings: JobKindSettings, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.waiting: list[Job] = []
        self.running = 0
        self._wake = asyncio.Event()
        self.on_change = on_change

    def _changed(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()
        self.on_change()

    def admit(self, job: Job, taken_over: bool = False) -> None:
        """Queues ``job`` last; 503 when ``max_queued`` wait already, unless it is
        ``taken_over`` from a lost replica (it was admitted once: refusing it would lose it)."""
        if len(self.waiting) >= self.settings.max_queued and not taken_over:
            raise Unavailable(
                f"{len(self.waiting)} {job.kind.name} jobs are waiting already; retry later",
                retry_after_s=max(1.0, job.kind.mean_seconds),
            )
        self.waiting.append(job)

    def leave(self, job: Job) -> None:
        if job in self.waiting:
            self.waiting.remove(job)
            self._changed()

    async def acquire(self, job: Job) -> None:
        try:
            while not (self.waiting[0] is job and self.running < self.settings.max_running):
                await self._wake.wait()
        except BaseException:
            self.leave(job)
            raise
        self.waiting.pop(0)
        self.running += 1
        self._changed()

    def release(self) -> None:
        self.running -= 1
        self._changed()
