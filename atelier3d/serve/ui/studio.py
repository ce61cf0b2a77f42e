"""What the "Edit" and "3D" tabs share: their source pickers, "send to" buttons, and following a
job (:mod:`atelier3d.serve.jobs.service`) with a progress bar driven by its events.

Both tabs start jobs on images of the Segment tab's session: the original, an object's cut-out, a
part of the parse the Body & garments tab shows, or an earlier edit. A picker's values are those
``ImageSource``s as JSON, so what is picked is exactly what the job request gets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from atelier3d.api.common import ImageSource
from atelier3d.errors import NotFound
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.jobs.sources import SourceResolver
from atelier3d.serve.jobs.types import Job
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import StoredParse
from atelier3d.serve.ui.common import EVENTS, ExportDir, ImageGate, UiState, guarded
from atelier3d.serve.ui.parse import ParseUi
from atelier3d.stages.mesh import MIN_BOX_PX
from atelier3d.stages.parse import Part

# The picker's groups, in the order they are listed (after the original image).
OBJECTS, PARTS, EDITS = "Objects", "Parts", "Edits"
UPLOAD = "upload"  # the 3D tab's own choice: an image uploaded there, not from the session
STAGES = {"encode": "Encoding", "denoise": "Denoising", "decode": "Decoding",
          "conditioning": "Conditioning", "volume_decode": "Decoding the volume",
          "mesh_extraction": "Extracting the mesh", "postprocess": "Post-processing",
          "texture": "Texturing"}


@dataclass
class Running:
    """The job a tab started last: what its Cancel button cancels."""

    job_id: str | None = None


@dataclass
class MeshRun(Running):
    """The 3D tab's job, and what it is of: its status line and its downloads' names."""

    what: str = ""
    stem: str = "mesh"


@dataclass
class Edit:
    job_id: str
    number: int  # "Edit N", counted in its session; numbers stay when old edits are dropped
    label: str
    source: ImageSource  # what it edited, for the before/after view


@dataclass
class EditUi(Running):
    """The edits made in this browser tab, of the session it shows (the results stay in the
    session, as its jobs)."""

    session_id: str | None = None
    edits: list[Edit] = field(default_factory=list)
    shown: Edit | None = None  # the one in the before/after view

    def history(self, session_id: str | None) -> list[Edit]:
        """The session's edits; a new image starts a new history."""
        if session_id != self.session_id:
            self.session_id, self.edits, self.shown = session_id, [], None
        return self.edits


def cancel_button(running: bool) -> dict:
    """Cancel is offered only while a job runs."""
    return gr.update(interactive=running)


def seed_and_steps(prefix: str) -> tuple[gr.Number, gr.Number]:
    """The parameters every job has (inside the caller's parameters accordion)."""
    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id=f"{prefix}-seed")
    steps = gr.Number(0, label="Steps (0: the server's)", precision=0, minimum=0,
                      elem_id=f"{prefix}-steps")
    return seed, steps


def source_key(source: ImageSource) -> str:
    return source.model_dump_json(exclude_defaults=True)


def source_of(key: str) -> ImageSource:
    return ImageSource.model_validate_json(key)


def edit_source(edit: Edit) -> ImageSource:
    return ImageSource(kind="job", job_id=edit.job_id)


def pickable(part: Part) -> bool:
    """Whether a part of the parse is offered as a source: not when it is empty or a few stray
    pixels of a label, which no edit or mesh can use (the 3D tab's own limit)."""
    x0, y0, x1, y1 = part.box
    return (max(x1 - x0, y1 - y0) >= MIN_BOX_PX and min(x1 - x0, y1 - y0) >= 2
            and bool(part.region.any()))


def grouped(group: str, name: str) -> str:
    """A picker's label: its group first ("Parts: Object 1 · upper-clothes")."""
    return f"{group}: {name}" if group else name


def optional(value: float | None) -> float | None:
    """A number box at 0 (or emptied) means "the server's default"."""
    return value or None


# ---- following a job ----------------------------------------------------------------------------


def describe(event: dict) -> str:
    """The progress bar's text for a job event: the stage and its step, or the queue."""
    kind = event["type"]
    if kind == "queued":
        text = f"Queued, {event['queue_position']} job(s) ahead"
    elif kind == "progress":
        text = f"{STAGES.get(event['stage'], event['stage'])} {event['step']}/{event['total']}"
        if event.get("parts", 1) > 1:
            text = f"{text} · part {event['part']}/{event['parts']}"
    elif kind == "artifact":
        text = f"{event['name'].capitalize()} ready"
    elif kind == "started":
        text = "Starting"
    elif kind == "retrying":
        text = f"A worker was lost; running again (attempt {event['attempt']})"
    elif kind == "taken_over":
        text = "Its server was lost while queued; queued again on another"
    else:  # the job finished
        return kind.capitalize()
    eta = event.get("eta_s")
    return f"{text} · ~{eta:.0f} s left" if eta else text


async def track(jobs: JobService, job: Job, progress: gr.Progress) -> AsyncIterator[dict]:
    """The job's events until it ends, each shown first as the progress bar (the whole job's
    fraction, with the stage and step as its text)."""
    async for event in jobs.follow(job.job_id):
        progress(event["progress"], desc=describe(event))
        yield event


def outcome(job: Job, what: str) -> str | None:
    """None when ``job`` succeeded; otherwise the status line saying how it ended (a failure
    also shows as a warning)."""
    if job.status == "succeeded":
        return None
    if job.status == "failed":
        message = (job.error or {}).get("message", "unknown error")
        gr.Warning(f"The {what} failed: {message}")
        return f"The {what} failed: {message}"
    return f"The {what} was {job.status}."


# ---- sources ---------------------------------------------------------------------------------


@dataclass
class Picker:
    """A tab's source dropdown; ``extra`` choices are the tab's own (the 3D tab's upload)."""

    tab_id: str
    dropdown: gr.Dropdown
    extra: tuple[tuple[str, str], ...] = ()


@dataclass
class Studio:
    """The services and the other tabs' states the Edit and 3D tabs build on."""

    segmentation: SegmentService
    parsing: ParseService
    jobs: JobService
    resolver: SourceResolver
    exports: ExportDir
    tabs: gr.Tabs
    state: gr.State  # UiState: the Segment tab's session and objects
    parse_state: gr.State  # ParseUi: the parse the Body & garments tab shows
    edit_state: gr.State  # EditUi: the Edit tab's history, which the 3D tab picks from too
    gate: ImageGate  # the buttons that need an image

    @property
    def states(self) -> list[gr.State]:
        return [self.state, self.parse_state, self.edit_state]

    def shown_parse(self, ui: UiState, pui: ParseUi) -> StoredParse | None:
        """The Body & garments tab's parse, if it is of the current image and still kept."""
        if pui.parse_id is None or pui.session_id != ui.session_id:
            return None
        with contextlib.suppress(NotFound):  # a session keeps its last few parses only
            return self.parsing.get(pui.session_id, pui.parse_id)
        return None

    def shown_part(self, ui: UiState, pui: ParseUi, _: EditUi) -> ImageSource | None:
        """The part the Body & garments tab shows large: its completed version if it has one
        (the whole garment is what an edit or a mesh wants)."""
        stored = self.shown_parse(ui, pui)
        if stored is None or pui.part is None:
            return None
        return ImageSource(kind="part", parse_id=pui.parse_id, part=pui.part,
                           completed=pui.part in stored.result.completed)

    async def sources(self, ui: UiState, pui: ParseUi, eui: EditUi
                      ) -> list[tuple[str, str, str]]:
        """(group, name, key) of every image of the session a job can start from: the original,
        then the objects' cut-outs, the shown parse's parts (not the empty ones) and the edits."""
        if ui.session_id is None:
            return []
        out = [("", "Original image", source_key(ImageSource()))]
        for object_id in ui.objects:
            if (await self.segmentation.get_object(ui.session_id, object_id)).selected is not None:
                out.append((OBJECTS, f"{ui.label(object_id)} cut-out",
                            source_key(ImageSource(kind="object", object_id=object_id))))
        stored = self.shown_parse(ui, pui)
        for part in stored.result.parts if stored else []:
            if not pickable(part):
                continue
            variants = [False, True] if part.name in stored.result.completed else [False]
            for completed in variants:
                source = ImageSource(kind="part", parse_id=pui.parse_id, part=part.name,
                                     completed=completed)
                name = f"{pui.object_label} · {part.name}" + (" (completed)" if completed else "")
                out.append((PARTS, name, source_key(source)))
        out += [(EDITS, edit.label, source_key(edit_source(edit)))
                for edit in self.done_edits(ui, eui)]
        return out

    async def choices(self, ui: UiState, pui: ParseUi, eui: EditUi) -> list[tuple[str, str]]:
        """(label, key) of every source, as the picker lists them: a dropdown has no option
        groups, so each label starts with its group's name."""
        sources = await self.sources(ui, pui, eui)
        return [(grouped(group, name), key) for group, name, key in sources]

    def done_edits(self, ui: UiState, eui: EditUi) -> list[Edit]:
        """The session's edits that have a result, oldest first. An edit joins the history when
        it is submitted (so a reload finds it while it runs); it leaves when it failed, was
        cancelled, or its session no longer keeps it."""
        done = []
        for edit in list(eui.history(ui.session_id)):
            try:
                job = self.jobs.get(edit.job_id)
            except NotFound:
                job = None
            if job is not None and job.status == "succeeded":
                done.append(edit)
            elif job is None or job.finished:
                eui.edits.remove(edit)
        return done

    async def label(self, ui: UiState, pui: ParseUi, eui: EditUi, key: str) -> str:
        """The name of the source ``key``, without its group (what a job's status line, an
        edit's label and a download's name say it is of)."""
        return next((name for _, name, k in await self.sources(ui, pui, eui) if k == key), "?")

    async def picker_update(self, picker: Picker, ui: UiState, pui: ParseUi, eui: EditUi,
                            wanted: str | None) -> dict:
        """The picker's choices now, with ``wanted`` chosen if it is one of them, else the
        current object's cut-out (or the first choice)."""
        choices = [*await self.choices(ui, pui, eui), *picker.extra]
        keys = [key for _, key in choices]
        current = (source_key(ImageSource(kind="object", object_id=ui.object_id))
                   if ui.object_id else None)
        value = next((key for key in (wanted, current) if key in keys), keys[0] if keys else None)
        return gr.update(choices=choices, value=value)

    def image(self, ui: UiState, key: str) -> np.ndarray:
        """The pixels of a picked source (RGB, or RGBA for cut-outs)."""
        return self.resolver.image(self.segmentation.store.get(ui.session_id), source_of(key))

    def link(self, picker: Picker, tab: gr.Tab, preview: gr.Image) -> None:
        """Refreshes the picker when its tab is opened, and previews what it picks."""

        @guarded()
        async def on_open(ui: UiState, pui: ParseUi, eui: EditUi, current: str | None) -> dict:
            return await self.picker_update(picker, ui, pui, eui, current)

        @guarded()
        async def on_pick(ui: UiState, key: str | None) -> np.ndarray | None:
            if ui.session_id is None or key is None or key == UPLOAD:
                return None
            return self.image(ui, key)

        quiet = {**EVENTS, "show_progress": "hidden"}
        tab.select(on_open, [*self.states, picker.dropdown], [picker.dropdown], **quiet)
        picker.dropdown.change(on_pick, [self.state, picker.dropdown], [preview], **quiet)

    def link_send(self, button: gr.Button, picker: Picker,
                  pick: Callable[[UiState, ParseUi, EditUi], ImageSource | None],
                  nothing: str) -> None:
        """``button`` makes what ``pick`` returns the picker's choice and opens its tab (or says
        ``nothing`` when there is nothing to send)."""

        @guarded()
        async def on_send(ui: UiState, pui: ParseUi, eui: EditUi) -> tuple:
            source = pick(ui, pui, eui)
            if source is None:
                gr.Info(nothing)
                return gr.skip()
            update = await self.picker_update(picker, ui, pui, eui, source_key(source))
            return update, gr.Tabs(selected=picker.tab_id)

        button.click(on_send, self.states, [picker.dropdown, self.tabs], **EVENTS)

    def running_job(self, run: Running) -> Job | None:
        """The job ``run`` follows, while the server still has it."""
        if run.job_id is None:
            return None
        with contextlib.suppress(NotFound):
            return self.jobs.get(run.job_id)
        return None

    def link_cancel(self, button: gr.Button, running: gr.State, what: str) -> None:
        @guarded()
        async def on_cancel(run: Running) -> None:
            job = self.jobs.get(run.job_id) if run.job_id else None
            if job is None or job.finished:
                gr.Info(f"No {what} is running.")
                return
            await self.jobs.cancel(job.job_id)

        button.click(on_cancel, [running], None, **EVENTS)
