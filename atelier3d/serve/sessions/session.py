"""A session: the image, its embedding reference, objects with undo/redo history, parses, jobs."""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from atelier3d.api.parse import ParseRequest, ParseResponse
from atelier3d.api.segment import MaskCandidate
from atelier3d.errors import NotFound
from atelier3d.stages.parse import ParseResult

T = TypeVar("T")


@dataclass
class Step:
    """One segmentation result recorded in an object's history."""

    points: list[tuple[float, float]]
    labels: list[int]
    box: tuple[float, float, float, float] | None
    candidates: list[MaskCandidate]  # as the decoder made them and the API sends them
    low_res: np.ndarray | None  # (K, 256, 256) logits, for refinement; None: decoded elsewhere
    selected: int
    uid: str | None = None  # its record's id in a shared store (Redis); None until saved there
    # How it was asked for beyond the prompt, so a recipe replays it the same way.
    refine: bool = False
    mask_input: dict | None = None  # an RLE
    multimask: bool = True


@dataclass
class SegObject:
    object_id: str
    max_history: int
    # A ``None`` step is a reset: the object is empty again, and undo brings back what was there.
    steps: list[Step | None] = field(default_factory=list)
    cursor: int = 0  # number of steps in effect; steps[cursor:] can be redone

    @property
    def current(self) -> Step | None:
        return self.steps[self.cursor - 1] if self.cursor else None

    def push(self, step: Step | None) -> int:
        del self.steps[self.cursor:]
        self.steps.append(step)
        if len(self.steps) > self.max_history:
            del self.steps[0]
        self.cursor = len(self.steps)
        return self.cursor

    def undo(self) -> None:
        self.cursor = max(0, self.cursor - 1)

    def redo(self) -> None:
        self.cursor = min(len(self.steps), self.cursor + 1)

    def reset(self) -> None:
        """Back to empty, as an undoable step."""
        if self.current is not None:
            self.push(None)


@dataclass
class Session:
    session_id: str
    client: str
    image: np.ndarray
    last_used: float
    embedding_ref: Any = None  # ray.ObjectRef once encoded; None when not (or no longer) resident
    embedding_task: asyncio.Task | None = None
    embedding_failed: bool = False
    objects: dict[str, SegObject] = field(default_factory=dict)
    parses: OrderedDict[str, StoredParse] = field(default_factory=OrderedDict)  # oldest first
    # Edit and mesh jobs (``serve.jobs.types.Job``) by id, oldest first; they go with it.
    jobs: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def get_object(self, object_id: str) -> SegObject:
        try:
            return self.objects[object_id]
        except KeyError:
            raise NotFound(f"object {object_id!r} not found in this session") from None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(18)}"


def new_step_uid() -> str:
    return secrets.token_urlsafe(9)


@dataclass
class StoredParse:
    response: ParseResponse
    result: ParseResult
    assets: dict[tuple[str, str | None], bytes] = field(default_factory=dict)
    # What was asked for (a recipe's parse): the mask parsed (an RLE) and the request's options.
    mask: dict | None = None
    request: ParseRequest | None = None
