"""The Segment tab: clicks, boxes, candidates, objects, undo/redo, cut-outs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from atelier3d import rle
from atelier3d.api.segment import CutoutRequest, MaskCandidate, ObjectState, SegmentRequest
from atelier3d.errors import ApiError, PayloadTooLarge
from atelier3d.imaging import downscaled, encode_png
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.ui.common import (
    EVENTS,
    ExportDir,
    ImageGate,
    Restore,
    UiState,
    client_key,
    guarded,
    hidden_links,
    legend,
    links,
    sentence,
    uploaded_file,
    with_progress,
)

ADD, REMOVE, BOX = "add (+)", "remove (−)", "box corner"

POSITIVE, NEGATIVE, CORNER = (0, 200, 0), (230, 0, 0), (255, 220, 0)

THUMB_PX = 256  # candidate thumbnails: small, they only need to tell the three apart


def _mask(candidate: MaskCandidate) -> np.ndarray:
    return rle.decode_own(candidate.rle.model_dump())


def _edges(mask: np.ndarray) -> np.ndarray:
    """The mask's one-pixel outline (pixels with a 4-neighbour outside the mask)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
          alpha: float) -> np.ndarray:
    """Blends ``colour`` over the masked pixels and draws their outline opaque."""
    out = image.copy()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return out
    # Only the mask's bounding box (and a pixel around it, for the outline) is worked on.
    box = np.s_[max(rows[0] - 1, 0):rows[-1] + 2, max(cols[0] - 1, 0):cols[-1] + 2]
    part, inside = out[box], mask[box]
    tint = np.array(colour, np.float32)
    part[inside] = (part[inside] * (1 - alpha) + tint * alpha).astype(np.uint8)
    part[_edges(inside)] = colour
    return out


def _marker_radius(image: np.ndarray) -> int:
    return max(5, round(min(image.shape[:2]) / 64))


def _draw_prompts(image: np.ndarray, obj: ObjectState, colour: tuple[int, int, int],
                  corner: tuple[float, float] | None) -> np.ndarray:
    """Point markers (green +, red −), the box, and a pending box corner, drawn with PIL."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    r = _marker_radius(image)
    if obj.box is not None:
        draw.rectangle(obj.box, outline=colour, width=max(2, r // 2))
    for (x, y), label in zip(obj.points, obj.labels, strict=True):
        fill = POSITIVE if label == 1 else NEGATIVE
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255), width=2)
    if corner is not None:
        x, y = corner
        draw.line([x - 2 * r, y, x + 2 * r, y], fill=CORNER, width=3)
        draw.line([x, y - 2 * r, x, y + 2 * r], fill=CORNER, width=3)
    return np.asarray(pil)


def render(ui: UiState, obj: ObjectState, others: list[ObjectState]
           ) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """The overlay (every object's selected mask, the current one brighter, with its prompts)
    and the current object's candidate thumbnails with their scores as captions."""
    image = ui.image
    overlay = image
    for other in others:  # other objects stay visible, faintly, so objects can be told apart
        if other.selected is not None:
            mask = _mask(other.masks[other.selected])
            overlay = _tint(overlay, mask, ui.colour(other.object_id), 0.25)
    colour = ui.colour(obj.object_id)
    masks = [_mask(candidate) for candidate in obj.masks]
    if obj.selected is not None:
        overlay = _tint(overlay, masks[obj.selected], colour, 0.5)
    overlay = _draw_prompts(overlay, obj, colour, ui.corner)

    # Thumbnails: shrink the image once, then each mask (nearest, so it stays binary).
    thumb = Image.fromarray(image)
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    small = np.asarray(thumb)
    gallery = []
    for i, (candidate, mask) in enumerate(zip(obj.masks, masks, strict=True)):
        small_mask = np.asarray(Image.fromarray(mask).resize(thumb.size, Image.NEAREST))
        mark = " ✓" if i == obj.selected else ""
        gallery.append((_tint(small, small_mask, colour, 0.55),
                        f"#{i + 1} score {candidate.score:.3f}{mark}"))
    return overlay, gallery


def render_files(exports: ExportDir, ui: UiState, obj: ObjectState, others: list[ObjectState]
                 ) -> tuple[str, list[tuple[str, str]]]:
    """``render``'s pictures as files, which reach the browser whole however often they are
    shown again (``ExportDir.picture``)."""
    overlay, gallery = render(ui, obj, others)
    return (exports.picture(overlay, "overlay"),
            [(exports.picture(thumb, f"candidate{i + 1}"), caption)
             for i, (thumb, caption) in enumerate(gallery)])


def _describe(ui: UiState, obj: ObjectState) -> str:
    name = ui.label(obj.object_id)
    if obj.selected is None:
        return f"**{name}**: click on the image to segment it."
    plus = sum(1 for label in obj.labels if label == 1)
    parts = [f"**{name}**", f"{plus} + / {len(obj.labels) - plus} − points"]
    if obj.box is not None:
        parts.append("box")
    score = obj.masks[obj.selected].score
    parts.append(f"mask {obj.selected + 1}/{len(obj.masks)} (score {score:.3f})")
    return " · ".join(parts)


def _empty_view(ui: UiState | None = None) -> tuple:
    """The view without an image."""
    message = "Upload an image or pick an example to start."
    return (ui or UiState(), None, [], message, gr.update(choices=[], value=None),
            gr.update(interactive=False), gr.update(interactive=False),
            gr.update(interactive=False), "{}", "")


def _refused_view(ui: UiState | None = None) -> tuple:
    """What a refused upload leaves: the empty view, and the upload cleared (the warning says
    why it was refused)."""
    if ui is not None:
        ui.clearing_upload = True
    return (*_empty_view(ui), None, gr.update(visible=False))


def _failed_downscale_view(ui: UiState | None = None) -> tuple:
    """The empty view; the upload is empty already (cleared when the image was refused)."""
    return (*_empty_view(ui), gr.skip(), gr.update(visible=False))


async def _view(service: SegmentService, exports: ExportDir, ui: UiState,
                obj: ObjectState | None = None, note: str = "") -> tuple:
    """Every output that depends on the session, in the order of ``view_outputs``."""
    if ui.session_id is None or ui.object_id is None:
        return _empty_view(ui)
    if obj is None:
        obj = await service.get_object(ui.session_id, ui.object_id)
    others = [await service.get_object(ui.session_id, other)
              for other in ui.objects if other != ui.object_id]
    overlay, thumbs = await asyncio.to_thread(render_files, exports, ui, obj, others)
    status = _describe(ui, obj)
    if ui.corner is not None:
        status += " · click the opposite corner of the box"
    if note:
        status += f" · {note}"
    choices = [(ui.label(object_id), object_id) for object_id in ui.objects]
    return (
        ui,
        overlay,
        gr.update(value=thumbs, selected_index=obj.selected),
        status,
        gr.update(choices=choices, value=ui.object_id),
        gr.update(interactive=obj.can_undo),
        gr.update(interactive=obj.can_redo),
        gr.update(interactive=obj.selected is not None),  # reset: only when there is a mask
        browser_view(ui, obj),
        object_legend(ui),
    )


def object_legend(ui: UiState) -> str:
    """The objects, each after a square of the colour the overlay draws it in."""
    return legend([(ui.label(object_id), ui.colour(object_id)) for object_id in ui.objects],
                  current=ui.label(ui.object_id) if ui.object_id in ui.objects else None)


def browser_view(ui: UiState, obj: ObjectState) -> str:
    """What the page's in-browser decoder needs to continue the object (segment_browser.js)."""
    height, width = ui.image.shape[:2]
    return json.dumps({
        "session_id": ui.session_id, "object_id": obj.object_id, "width": width,
        "height": height, "step": obj.step, "points": obj.points, "labels": obj.labels,
        "box": obj.box, "selected": obj.selected,
        # a box's first corner taken on the server path: the page's next click completes it
        "corner": list(ui.corner) if ui.corner is not None else None,
    })


async def _wait_encoded(service: SegmentService, session_id: str,
                        progress: gr.Progress) -> None:
    """Shows the encode's (time-based) progress until the embedding is ready, or raises its
    error. ``wait_ready`` shields the encode, so a tab closed meanwhile does not cancel it."""
    await with_progress(service.wait_ready(session_id),
                        lambda: service.encode_progress(session_id), progress,
                        "Encoding the image")


async def _first_object(service: SegmentService, exports: ExportDir, ui: UiState,
                        progress: gr.Progress, start: float) -> tuple:
    """Waits for the session's encode, then makes its first object: the view of a new image
    (also after a reload in the middle of the encode); ``start``: when the upload began, so the
    time to ready counts the decode too."""
    session_id = ui.session_id
    await _wait_encoded(service, session_id, progress)
    obj = await service.create_object(session_id)
    ui.objects, ui.object_id = [obj.object_id], obj.object_id
    height, width = ui.image.shape[:2]
    note = f"image {width}×{height} ready in {time.monotonic() - start:.1f} s"
    return await _view(service, exports, ui, obj, note)


def segment_tab(service: SegmentService, state: gr.State, exports: ExportDir,
                gate: ImageGate) -> Restore:
    """The Segment tab's components and events; call inside its ``gr.Tab``. Its buttons that
    need an image, and its view that says when there is one, go to ``gate``."""
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            # Its events take the upload undecoded (preprocess=False): see uploaded_file.
            upload = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                              height=260, elem_id="upload")
            downscale = gr.Button("Downscale it to fit and use it", visible=False,
                                  elem_id="downscale")
            example_files = exports.examples()
            # A gallery, not gr.Examples: its thumbnails show their captions and carry them as
            # alt text, where gr.Examples' show either the image (no alt) or the label alone.
            examples = gr.Gallery([(path, caption) for caption, path in example_files],
                                  label="Examples (click one to use it)", columns=4,
                                  height="auto", allow_preview=False, object_fit="contain",
                                  buttons=[], interactive=False, elem_id="examples")
            mode = gr.Radio([ADD, REMOVE, BOX], value=ADD, label="Click mode",
                            info="or drag a box on the image · keys: A add, R remove, B box, "
                                 "N new object, Ctrl+Z undo, Ctrl+Y redo",
                            elem_id="click-mode")
            with gr.Row():
                objects = gr.Dropdown(label="Object", choices=[],
                                      interactive=True, elem_id="object-select")
                new_object = gr.Button("New object", interactive=False, elem_id="new-object")
            # Each object's overlay colour next to its name (a dropdown's choices are text).
            object_colours = gr.HTML(elem_id="object-legend")
            with gr.Row():
                undo = gr.Button("Undo", interactive=False, elem_id="undo")
                redo = gr.Button("Redo", interactive=False, elem_id="redo")
                reset = gr.Button("Reset", interactive=False, elem_id="reset")
            export = gr.Button("Export cut-out + RLE", variant="primary", interactive=False,
                               elem_id="export")
            # Hidden until the first export.
            cutout_file = gr.HTML(visible=False, elem_id="cutout-download")
            rle_file = gr.HTML(visible=False, elem_id="rle-download")
        with gr.Column(scale=2):
            status = gr.Markdown("Upload an image or pick an example to start.",
                                 elem_id="status")
            overlay = gr.Image(label="Click on the image to segment",
                               interactive=False, buttons=["fullscreen"],
                               height=560, elem_id="overlay")
            # height "auto": the three thumbnails and their scores show without scrolling.
            candidates = gr.Gallery(label="Candidates (click to choose)",
                                    columns=3, height="auto", allow_preview=False,
                                    object_fit="contain", elem_id="candidates")
    # Hidden: the page's in-browser decoder reads the object from it, and clicks the button
    # to have this view redrawn after it recorded a step.
    browser_state = gr.Textbox("{}", elem_id="segment-state", elem_classes=["a3d-hidden"])
    browser_sync = gr.Button("sync", elem_id="browser-sync", elem_classes=["a3d-hidden"])
    view_outputs = [state, overlay, candidates, status, objects, undo, redo, reset,
                    browser_state, object_colours]
    gate.needs_image(new_object, export)
    gate.follows(browser_state)

    async def open_image(ui: UiState, data: bytes, name: str, request: gr.Request,
                         progress: gr.Progress, start: float) -> tuple:
        """A new session for the image ``data`` (decoded by the server, as /v1 does: a refused
        one reads as the API's 4xx), shown once encoded, with its first object."""
        info = await service.create_session(data, client=client_key(request))
        # Owned from here on, so the next upload deletes it even if this one fails below.
        ui.start(info.session_id, service.store.get(info.session_id).image, None)
        ui.image_name = name
        return (*await _first_object(service, exports, ui, progress, start), gr.skip(),
                gr.update(visible=False))

    async def forget(ui: UiState) -> None:
        """A new image replaces this tab's session: the old one is freed now, not at its TTL."""
        if ui.session_id is not None:
            with contextlib.suppress(ApiError):  # NotFound: it expired already
                await service.delete_session(ui.session_id)
        ui.start(None, None, None)

    @guarded(fallback=_refused_view)
    async def on_image(payload: dict | None, ui: UiState, request: gr.Request,
                       progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        upload = uploaded_file(payload)
        if upload is None and ui.clearing_upload:  # our own clearing of a refused image
            ui.clearing_upload = False
            return gr.skip()
        await forget(ui)
        if upload is None:
            return (*_empty_view(ui), gr.skip(), gr.skip())
        start = time.monotonic()
        data = await asyncio.to_thread(upload.read)
        ui.too_big = None
        try:
            return await open_image(ui, data, upload.stem, request, progress, start)
        except PayloadTooLarge as exc:
            if "pixels" not in exc.message:
                raise
            ui.too_big = upload  # over the pixel limit: offered to downscale
            gr.Warning(f"{sentence(exc.message)} Downscale it to fit, or upload a smaller one.")
            ui.clearing_upload = True
            return (*_empty_view(ui), None, gr.update(visible=True))

    def on_example(evt: gr.SelectData) -> str:
        """The example clicked, put in the upload (whose change event opens it)."""
        return example_files[evt.index][1]

    @guarded(fallback=_failed_downscale_view)
    async def on_downscale(ui: UiState, request: gr.Request,
                           progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        if ui.too_big is None:
            return (*_empty_view(ui), gr.skip(), gr.update(visible=False))
        upload, ui.too_big = ui.too_big, None
        await forget(ui)
        start = time.monotonic()
        max_pixels = service.config.limits.max_pixels
        data = await asyncio.to_thread(upload.read)
        smaller = await asyncio.to_thread(downscaled, data, max_pixels)
        png = await asyncio.to_thread(encode_png, np.ascontiguousarray(smaller))
        return await open_image(ui, png, upload.stem, request, progress, start)

    @guarded(fallback=_empty_view)
    async def on_restore(ui: UiState,
                         progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        """The tab as it was before a reload: the image, its objects, the current one."""
        if not ui.reloaded:
            return gr.skip()
        if ui.session_id is None or service.store.find(ui.session_id) is None:
            ui.start(None, None, None)
            return _empty_view(ui)
        if ui.object_id is None:  # reloaded while the image was encoding
            return await _first_object(service, exports, ui, progress, time.monotonic())
        return await _view(service, exports, ui, note="restored after a reload")

    @guarded()
    async def on_click(ui: UiState, click_mode: str, evt: gr.SelectData) -> tuple:
        if ui.session_id is None or ui.object_id is None:
            gr.Info("Upload an image first.")
            return gr.skip()
        x, y = (float(v) for v in evt.index)
        obj = await service.get_object(ui.session_id, ui.object_id)
        points, labels, box = list(obj.points), list(obj.labels), obj.box
        if click_mode == BOX:
            if ui.corner is None:  # first corner: only remembered, nothing to segment yet
                ui.corner = (x, y)
                return await _view(service, exports, ui, obj)
            (x0, y0), ui.corner = ui.corner, None
            box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
            if box[2] <= box[0] or box[3] <= box[1]:
                gr.Warning("The box's corners must differ in x and y; start again.")
                return await _view(service, exports, ui, obj)
        else:
            points.append((x, y))
            labels.append(0 if click_mode == REMOVE else 1)
        request = SegmentRequest(
            points=points, labels=labels, box=box, multimask=True, object_id=ui.object_id,
            # Refine the mask the object has (its logits), as SAM's own demo does.
            refine=obj.selected is not None,
        )
        # The object's new state comes back with the step: no second load to show it.
        result, obj = await service.segment_step(ui.session_id, request)
        note = f"{result.timings_ms.total_ms:.0f} ms"
        return await _view(service, exports, ui, obj, note=note)

    @guarded()
    async def on_pick(ui: UiState, evt: gr.SelectData) -> tuple:
        if ui.session_id is None or ui.object_id is None:
            return gr.skip()
        obj = await service.select(ui.session_id, ui.object_id, int(evt.index))
        return await _view(service, exports, ui, obj)

    @guarded()
    async def on_new_object(ui: UiState) -> tuple:
        if ui.session_id is None:
            gr.Info("Upload an image first.")
            return gr.skip()
        obj = await service.create_object(ui.session_id)
        ui.objects.append(obj.object_id)
        ui.object_id, ui.corner = obj.object_id, None
        return await _view(service, exports, ui, obj)

    @guarded()
    async def on_switch(ui: UiState, object_id: str | None) -> tuple:
        if ui.session_id is None or object_id not in ui.objects:
            return gr.skip()
        ui.object_id, ui.corner = object_id, None
        return await _view(service, exports, ui)

    @guarded()
    async def on_browser_step(ui: UiState) -> tuple:
        if ui.session_id is None or ui.object_id is None:
            return gr.skip()
        ui.corner = None
        return await _view(service, exports, ui, note="decoded in the browser")

    def make_edit(action: str) -> Callable[[UiState], Awaitable[tuple]]:
        @guarded()
        async def on_edit(ui: UiState) -> tuple:
            if ui.session_id is None or ui.object_id is None:
                return gr.skip()
            ui.corner = None
            obj = await service.edit_object(ui.session_id, ui.object_id, action)
            return await _view(service, exports, ui, obj)

        on_edit.__name__ = f"on_{action}"
        return on_edit

    @guarded()
    async def on_export(ui: UiState) -> tuple:
        if ui.session_id is None or ui.object_id is None:
            gr.Info("Upload an image and segment something first.")
            return gr.skip()
        obj = await service.get_object(ui.session_id, ui.object_id)
        if obj.selected is None:
            gr.Info("This object has no mask yet: click on the image first.")
            return gr.skip()
        png = await service.cutout(
            ui.session_id, CutoutRequest(object_id=ui.object_id, background="transparent")
        )
        chosen = obj.masks[obj.selected]
        mask_json = {"object_id": ui.object_id, **chosen.model_dump(mode="json")}
        stem = ui.file_stem(ui.label(ui.object_id))
        cutout, mask = await asyncio.to_thread(exports.offer, ui, {
            f"{stem}.png": png,
            f"{stem}.rle.json": json.dumps(mask_json, indent=1).encode(),
        })
        return links([cutout], "Cut-out (PNG)"), links([mask], "Mask (RLE JSON)")

    # Every handler only awaits the service (the models run in other deployments), so none
    # needs the queue's default limit of one at a time: one tab's encode must not hold up
    # another tab's clicks. Back-pressure lives in the deployments' max_ongoing_requests.
    # Clicks are "multiple" (none is dropped while one is pending); the tab's lock orders them.
    # Progress shows on the overlay only, so the status line stays readable.
    # They are also kept out of Gradio's API ("private"): the programmatic API is /v1.
    events: dict[str, Any] = {**EVENTS, "show_progress_on": [overlay]}
    clicks: dict[str, Any] = {**events, "trigger_mode": "multiple", "show_progress": "minimal"}
    upload.change(on_image, [upload, state], [*view_outputs, upload, downscale], **events,
                  preprocess=False)
    examples.select(on_example, None, [upload], **events)
    downscale.click(on_downscale, [state], [*view_outputs, upload, downscale], **events)
    overlay.select(on_click, [state, mode], view_outputs, **clicks)
    candidates.select(on_pick, [state], view_outputs, **clicks)
    browser_sync.click(on_browser_step, [state], view_outputs, **clicks)
    new_object.click(on_new_object, [state], view_outputs, **events)
    objects.input(on_switch, [state, objects], view_outputs, **events)
    for button, action in ((undo, "undo"), (redo, "redo"), (reset, "reset")):
        button.click(make_edit(action), [state], view_outputs, **clicks)
    export.click(on_export, [state], [cutout_file, rle_file], **events)
    # A new image: the previous image's files are not offered with it.
    upload.change(lambda: (hidden_links(), hidden_links()), None, [cutout_file, rle_file],
                  **events, show_progress="hidden")
    return Restore(on_restore, [state], view_outputs)
