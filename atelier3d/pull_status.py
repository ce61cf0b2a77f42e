"""How far the weights ``atelier3d serve`` is fetching have come, for everyone who must know.

``serve --models real`` pulls the configured models it finds missing while the application
deploys (``atelier3d.models.pull.BackgroundPull``). That pull keeps its progress in
``<cache>/pull-status.json`` (rewritten every second); the Gateway reads it for ``/readyz`` and
the UI banner, and each model replica waits on it for its own weights instead of fetching them
itself. Pydantic and the standard library only: the Gateway imports this, and it runs no torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

STATUS_NAME = "pull-status.json"
# A running pull rewrites its status every second: one not rewritten for this long belongs to a
# process that is gone (killed), and nobody should wait on it.
STALE_S = 30.0
WAIT_POLL_S = 1.0
WAIT_LOG_S = 30.0  # how often a waiting replica says what it waits for


class PullFailed(RuntimeError):
    """The pull that a model replica waited on ended without its weights."""


def human_bytes(n: float | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


class ModelProgress(BaseModel):
    """How much of one configured model is on disk."""

    key: str  # sam, segformer, pose, edit, edit_plus, lightning_lora, mesh, paint
    label: str
    source: str
    state: Literal["complete", "partial", "missing", "unknown"]  # unknown: never planned here
    total_bytes: int | None
    present_bytes: int

    @property
    def fraction(self) -> float | None:
        if self.state == "complete":
            return 1.0
        return self.present_bytes / self.total_bytes if self.total_bytes else None

    def describe(self) -> str:
        """One line for a status page: ``Qwen-Image-Edit (Qwen/...): 43% of 53.80 GiB``."""
        head = f"{self.label} ({self.source})"
        if self.state == "unknown":
            return f"{head}: not pulled on this machine (`atelier3d models pull`)"
        if self.fraction is None:
            return f"{head}: {self.state}"
        return f"{head}: {self.fraction:.0%} of {human_bytes(self.total_bytes)}"


class PullStatus(BaseModel):
    """What a pull running beside the server last said about itself."""

    state: Literal["running", "done", "failed"]
    updated: float  # time.time() of the last rewrite
    models: list[ModelProgress]
    error: str | None = None  # failed: why

    def is_live(self) -> bool:
        return time.time() - self.updated < STALE_S

    def downloading(self) -> list[ModelProgress]:
        """The models still coming in, while the pull runs (none once it ended, or is gone)."""
        if self.state != "running" or not self.is_live():
            return []
        return [m for m in self.models if m.state != "complete"]


def status_path(cache: Path) -> Path:
    return cache / STATUS_NAME


def write_status(cache: Path, status: PullStatus) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    path = status_path(cache)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(status.model_dump_json())
    os.replace(tmp, path)  # readers never see half a file


def clear_status(cache: Path) -> None:
    """Forgets an earlier pull's status (a server that pulls nothing has none)."""
    status_path(cache).unlink(missing_ok=True)


def read_status(cache: Path) -> PullStatus | None:
    try:
        return PullStatus.model_validate_json(status_path(cache).read_text())
    except (OSError, ValidationError):
        return None


def downloading_message(cache: Path) -> str | None:
    """``/readyz``'s and the UI banner's words while the server's pull runs: each model still
    downloading, with its percentage. None when no pull is running."""
    status = read_status(cache)
    models = status.downloading() if status is not None else []
    if not models:
        return None
    return ("downloading model weights: " + "; ".join(m.describe() for m in models)
            + ". The models start once their weights are on disk.")


def wait_for_weights(cache: Path, keys: Collection[str]) -> None:
    """Blocks a model replica while the server's pull is still fetching any of ``keys`` (the
    replica then loads them from the cache rather than downloading them itself, unseen).
    Returns at once where no pull runs; raises :class:`PullFailed` where it failed first."""
    said = 0.0
    while True:
        status = read_status(cache)
        if status is None or not status.is_live():
            return
        pending = [m for m in status.models if m.key in keys and m.state != "complete"]
        if not pending or status.state == "done":
            return
        if status.state == "failed":
            raise PullFailed(f"the weights of {', '.join(m.label for m in pending)} could not "
                             f"be pulled: {status.error}")
        if time.monotonic() - said > WAIT_LOG_S:
            logger.info("waiting for the server's pull: %s",
                        "; ".join(m.describe() for m in pending))
            said = time.monotonic()
        time.sleep(WAIT_POLL_S)
