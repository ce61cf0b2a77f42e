"""The "Edit" tab: text-driven edits (Qwen-Image-Edit) of the session's images.

Each run is an edit job on the server (:class:`atelier3d.serve.edit.service.EditService`), followed
here through its events, so the progress bar shows the pipeline's real steps. Results stay in the
session as its jobs: the history lists this tab's edits, and picking one makes it the source of
the next edit, so any earlier result can be branched from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import gradio as gr
import numpy as np

from atelier3d.api.common import ImageSource
from atelier3d.api.edit import EditJobRequest
from atelier3d.config import SIZE_MULTIPLE
from atelier3d.errors import NotFound
from atelier3d.imaging import decode_png, encode_png
from atelier3d.serve.edit.service import EditService
from atelier3d.serve.ui.common import EVENTS, Restore, UiState, client_key, guarded
from atelier3d.serve.ui.parse import ParseUi
from atelier3d.serve.ui.region import (
    REGION_HEX,
    mask_rle,
    painted_mask,
    region_value,
    result_note,
)
from atelier3d.serve.ui.studio import (
    Edit,
    EditUi,
    Picker,
    Studio,
    cancel_button,
    edit_source,
    optional,
    outcome,
    seed_and_steps,
    source_key,
    source_of,
    track,
)
from atelier3d.stages.edit import PRESETS

PROMPT_LEN = 40  # of the prompt, in an edit's label


@dataclass
class EditTab:
    picker: Picker
    to_3d: gr.Button  # "Use this for 3D": the 3D tab links it to its picker
    restore: Restore


def preset_words(name: str) -> str:
    """A preset as the picker shows it: its name in words."""
    return name.replace("_", " ").capitalize().replace("T pose", "T-pose")


def preset_text(name: str) -> str:
    """What a preset adds to the prompt, shown under the picker."""
    prompt = PRESETS[name].prompt if name in PRESETS else ""
    if not prompt:
        return "*Adds nothing: your prompt is the whole instruction.*"
    return f"*Adds to the prompt:* “{prompt}”"


def _edit(job_id: str, history: list[Edit], body: EditJobRequest, source_label: str) -> Edit:
    """The history's next edit, labelled "Edit N · preset “prompt” ← source"; an earlier edit
    is named by its number only, so labels stay short however long a chain of edits grows."""
    prompt = body.prompt.strip()
    if len(prompt) > PROMPT_LEN:
        prompt = prompt[:PROMPT_LEN - 1] + "…"
    quoted = f" “{prompt}”" if prompt else ""
    parent = next((edit for edit in history if edit.job_id == body.source.job_id), None)
    source = f"Edit {parent.number}" if parent else source_label
    number = history[-1].number + 1 if history else 1
    return Edit(job_id, number, f"Edit {number} · {body.preset}{quoted} ← {source}", body.source)


def edit_tab(studio: Studio, editing: EditService) -> EditTab:
    """Builds the tab (inside the caller's ``gr.Tabs``) and its events."""
    jobs = studio.jobs
    with gr.Tab("Edit", id="edit") as tab:
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                source = gr.Dropdown(label="Source", choices=[], elem_id="edit-source")
                preview = gr.Image(label="Source image", interactive=False, format="png",
                                   height=200, elem_id="edit-preview")
                region = gr.ImageEditor(
                    label="Region to repaint: paint it, or erase (none: the whole image)",
                    type="numpy", image_mode="RGBA", format="png", sources=(), transforms=(),
                    layers=False,
                    brush=gr.Brush(colors=[REGION_HEX], color_mode="fixed"),
                    eraser=gr.Eraser(), height=320, elem_id="edit-region")
                reference = gr.Image(
                    label="Reference image, optional: a garment to dress the character in (a "
                    "server with a multi-image model)", type="numpy", image_mode="RGB",
                    sources=("upload",), format="png", height=160, elem_id="edit-reference")
                preset = gr.Dropdown([(preset_words(name), name) for name in PRESETS],
                                     value="full_body", label="Preset", elem_id="edit-preset")
                preset_info = gr.Markdown(preset_text("full_body"), elem_id="edit-preset-text")
                prompt = gr.Textbox(label="Prompt (added to the preset's; needed for free)",
                                    lines=2, elem_id="edit-prompt")
                with gr.Accordion("Parameters", open=False, elem_id="edit-parameters"):
                    seed, steps = seed_and_steps("edit")
                    cfg = gr.Number(0, label="True CFG scale (0: the server's)",
                                    minimum=0, maximum=20, elem_id="edit-cfg")
                    negative = gr.Textbox(label="Negative prompt (empty: the preset's)",
                                          elem_id="edit-negative")
                    with gr.Row():
                        width = gr.Number(0, label="Width (0: the model's)", precision=0,
                                          minimum=0, step=SIZE_MULTIPLE, elem_id="edit-width")
                        height = gr.Number(0, label="Height (0: the model's)", precision=0,
                                           minimum=0, step=SIZE_MULTIPLE,
                                           elem_id="edit-height")
                with gr.Row():
                    run = gr.Button("Run the edit", variant="primary", interactive=False,
                                    elem_id="edit-run")
                    cancel = gr.Button("Cancel", interactive=False, elem_id="edit-cancel")
                status = gr.Markdown("Pick a source, a preset and a prompt, then run.",
                                     elem_id="edit-status")
            with gr.Column(scale=2):
                compare = gr.ImageSlider(label="Before / after", type="numpy", format="png",
                                         interactive=False, height=520, elem_id="edit-compare")
                # height "auto": it grows with the history, so no label is read by scrolling.
                history = gr.Gallery(label="Edits of this image (click one to edit it further)",
                                     columns=4, height="auto", allow_preview=False,
                                     object_fit="contain", format="png", elem_id="edit-history")
                to_3d = gr.Button("Use this for 3D", interactive=False, elem_id="edit-to-3d")
    picker = Picker("edit", source)
    studio.gate.needs_image(run)
    studio.link(picker, tab, preview)
    studio.link_cancel(cancel, studio.edit_state, "edit")

    @guarded()
    async def on_region(ui: UiState, key: str | None, preset_name: str) -> dict | None:
        """The source under an empty layer; complete_occluded on a part starts with the region
        the server would repaint (its hidden region), to be seen and changed before it runs."""
        if ui.session_id is None or key is None:
            return None
        source = source_of(key)
        image = await asyncio.to_thread(studio.image, ui, key)
        hidden = None
        if preset_name == "complete_occluded":
            hidden = editing.resolver.hidden_region(editing.store.get(ui.session_id), source)
        return region_value(image, hidden, studio.segmentation.config.limits.max_upload_bytes)

    async def result(edit: Edit) -> np.ndarray:
        return await asyncio.to_thread(decode_png, jobs.result(edit.job_id).data)

    async def gallery(ui: UiState, eui: EditUi) -> list[tuple[np.ndarray, str]]:
        """The history's results."""
        return [(await result(edit), edit.label) for edit in studio.done_edits(ui, eui)]

    async def before_after(ui: UiState, edit: Edit) -> tuple[np.ndarray | None, np.ndarray]:
        before = None
        with contextlib.suppress(NotFound):  # its source may be gone (an evicted parse)
            before = await asyncio.to_thread(studio.image, ui, source_key(edit.source))
        return before, await result(edit)

    async def view(ui: UiState, pui: ParseUi, eui: EditUi, edit: Edit, note: str,
                   source_wanted: str | None) -> tuple:
        """Every output but the progress, for ``edit`` shown in the before/after view."""
        eui.shown = edit
        pictures = await gallery(ui, eui)
        return (
            note,
            await before_after(ui, edit),
            gr.update(value=pictures,
                      selected_index=studio.done_edits(ui, eui).index(edit)),
            await studio.picker_update(picker, ui, pui, eui, source_wanted),
            gr.update(interactive=True),
            cancel_button(False),
        )

    async def follow(ui: UiState, pui: ParseUi, eui: EditUi, edit: Edit,
                     progress: gr.Progress) -> AsyncIterator[tuple]:
        """Follows ``edit``'s job with the progress bar, then shows it (as it was run, or after
        a reload found it running)."""
        job = jobs.get(edit.job_id)
        yield (f"Editing: **{edit.label}**…", *[gr.skip()] * 4, cancel_button(True))
        async for _ in track(jobs, job, progress):
            pass
        failed = outcome(job, "edit")
        if failed is not None:
            yield (failed, *[gr.skip()] * 4, cancel_button(False))
            return
        seconds = job.finished_at - job.started_at
        note = f"**{edit.label}** · done in {seconds:.1f} s" + result_note(job.result.meta)
        yield await view(ui, pui, eui, edit, note, source_key(edit.source))

    @guarded(lock=False)  # an edit takes a while: the tab's other events must not wait
    async def on_run(ui: UiState, pui: ParseUi, eui: EditUi, key: str | None, preset_name: str,
                     prompt_text: str, negative_text: str, seed_value: float | None,
                     steps_value: float | None, cfg_value: float | None,
                     width_value: float | None, height_value: float | None,
                     region_painted: dict | None, reference_image: np.ndarray | None,
                     request: gr.Request,
                     progress: gr.Progress = gr.Progress()  # noqa: B008
                     ) -> AsyncIterator[tuple]:
        if ui.session_id is None or key is None:
            gr.Info("Upload an image in the Segment tab first.")
            yield gr.skip()
            return
        shape = (await asyncio.to_thread(studio.image, ui, key)).shape[:2]
        extra = []
        if reference_image is not None:  # kept as an upload of its own, named as a source
            data = await asyncio.to_thread(encode_png, reference_image)
            upload = await editing.store.create(client_key(request), reference_image, data)
            extra = [ImageSource(kind="session", session_id=upload.session_id)]
        body = EditJobRequest(
            session_id=ui.session_id, source=source_of(key), preset=preset_name,
            prompt=prompt_text or "", negative_prompt=(negative_text or "").strip() or None,
            seed=int(seed_value or 0), steps=optional(steps_value),
            true_cfg_scale=optional(cfg_value), width=optional(width_value),
            height=optional(height_value), mask=mask_rle(painted_mask(region_painted, shape)),
            extra_sources=extra,
        )
        source_label = await studio.label(ui, pui, eui, key)
        job = await editing.submit(body, client=client_key(request))
        eui.job_id = job.job_id
        # In the history from now on: a reload finds it, running or done.
        history = eui.history(body.session_id)
        edit = _edit(job.job_id, history, body, source_label)
        history.append(edit)
        async for update in follow(ui, pui, eui, edit, progress):
            yield update

    @guarded(lock=False)
    async def on_restore(ui: UiState, pui: ParseUi, eui: EditUi,
                         progress: gr.Progress = gr.Progress()  # noqa: B008
                         ) -> AsyncIterator[tuple]:
        """After a reload: the edit running then, followed again; or the one shown then."""
        if not ui.reloaded:
            yield gr.skip()
            return
        edits = eui.history(ui.session_id)
        job = studio.running_job(eui)
        running = next((e for e in edits if job and e.job_id == job.job_id), None)
        if running is not None and not job.finished:
            async for update in follow(ui, pui, eui, running, progress):
                yield update
            return
        done = studio.done_edits(ui, eui)
        if not done:
            yield gr.skip()
            return
        shown = eui.shown if eui.shown in done else done[-1]
        yield await view(ui, pui, eui, shown, f"**{shown.label}** · restored after a reload",
                         source_key(edit_source(shown)))

    @guarded()
    async def on_history(ui: UiState, pui: ParseUi, eui: EditUi, evt: gr.SelectData) -> tuple:
        edits = studio.done_edits(ui, eui)
        if int(evt.index) >= len(edits):
            return gr.skip()
        edit = edits[int(evt.index)]
        note = f"**{edit.label}** · the source of the next edit"
        return await view(ui, pui, eui, edit, note, source_key(edit_source(edit)))

    outputs = [status, compare, history, source, to_3d, cancel]
    events = {**EVENTS, "show_progress_on": [compare]}
    preset.change(preset_text, [preset], [preset_info], **EVENTS, show_progress="hidden")
    for changed in (source, preset):
        changed.change(on_region, [studio.state, source, preset], [region], **EVENTS,
                       show_progress="hidden")
    run.click(on_run, [*studio.states, source, preset, prompt, negative, seed, steps, cfg, width,
                       height, region, reference], outputs, **events)
    history.select(on_history, studio.states, outputs, **events)
    return EditTab(picker, to_3d, Restore(on_restore, studio.states, outputs))
