"""The "Body & garments" tab: body and garment separation of the Segment tab's current object.

It shares the Segment tab's ``UiState`` (session, image, current object) and calls the
ParseService in-process; the parse itself stays on the server (with the session), and this tab
only remembers which one it shows. The overlay is re-drawn from that stored parse when labels or
the skeleton are toggled, without parsing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import gradio as gr
import numpy as np

from atelier3d.api.parse import ParseRequest, ParseResponse
from atelier3d.errors import NotFound
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.sessions.session import StoredParse
from atelier3d.serve.ui.common import (
    EVENTS,
    ExportDir,
    ImageGate,
    Restore,
    UiState,
    guarded,
    hidden_links,
    legend,
    links,
    with_progress,
)
from atelier3d.stages.parse import LABEL_IDS, PALETTE, ParseResult, colorize, render_pose_map

TINT = 0.55  # opacity of the label colours over the image
FADE = 0.5  # how far what is not the character fades to white


@dataclass
class ParseUi:
    """The parse this browser tab shows (its results live with the session on the server)."""

    session_id: str | None = None
    parse_id: str | None = None
    object_label: str = ""
    part: str | None = None  # the part shown large, with its downloads


@dataclass
class ParseTab:
    """What the Edit and 3D tabs link to: the parse shown, and the buttons sending its part."""

    state: gr.State  # ParseUi
    send_edit: gr.Button
    send_3d: gr.Button
    restore: Restore


# ---- drawing ----------------------------------------------------------------------------------


def render_overlay(image: np.ndarray, result: ParseResult, shown: list[str],
                   skeleton: bool) -> np.ndarray:
    """The image with the ``shown`` labels tinted in the ATR palette, everything outside the
    character faded, and optionally the OpenPose skeleton on top."""
    out = image.astype(np.float32)
    label_map = result.label_map
    outside = label_map == 0
    out[outside] = out[outside] * (1 - FADE) + 255 * FADE
    tinted = np.isin(label_map, [LABEL_IDS[name] for name in shown])
    out[tinted] = out[tinted] * (1 - TINT) + colorize(label_map)[tinted] * TINT
    out = out.round().astype(np.uint8)
    if skeleton and result.pose is not None:
        pose = render_pose_map(result.pose, result.size)
        drawn = pose.any(axis=-1)
        out[drawn] = pose[drawn]
    return out


def _legend(labels: list[str]) -> str:
    entries = []
    for name in labels:
        r, g, b = (int(v) for v in PALETTE[LABEL_IDS[name]])
        entries.append((name, (r, g, b)))
    return legend(entries)


def _checks(response: ParseResponse) -> str:
    lines = ["**Checks before 3D**", ""]
    for check in response.checks:
        title = check.name.replace("_", " ").capitalize()
        line = f"- {'✓' if check.passed else '✗'} **{title}**: {check.reason}"
        if not check.passed and check.suggestion:
            line += f" — *suggestion:* {check.suggestion}"
        lines.append(line)
    return "\n".join(lines)


def _status(pui: ParseUi, response: ParseResponse) -> str:
    passed = sum(check.passed for check in response.checks)
    pose = f"{len(response.keypoints)} keypoints" if response.keypoints else "no pose"
    return (f"**{pui.object_label}** parsed: {len(response.labels)} labels, "
            f"{len(response.parts)} parts, {pose}, {passed}/{len(response.checks)} checks passed "
            f"· {response.timings_ms.total_ms:.0f} ms")


def _caption(response: ParseResponse, index: int) -> str:
    part = response.parts[index]
    return part.name + (" · completed" if part.completed_url else "")


# ---- the tab ----------------------------------------------------------------------------------


def parse_tab(parsing: ParseService, state: gr.State, exports: ExportDir, gate: ImageGate,
              sends: bool = False) -> ParseTab:
    """Builds the tab (inside the caller's ``gr.Tabs``) and its events; ``sends``: show the
    buttons sending the part shown to the Edit and 3D tabs (which link them); ``gate`` gets
    the buttons that need an image."""
    segmentation = parsing.segmentation
    with gr.Tab("Body & garments", id="parse"):
        pstate = gr.State(ParseUi())
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                gr.Markdown("Separates the **current object** of the Segment tab into body "
                            "parts and garments: a parse map, the pose, one cut-out per garment "
                            "and checks for image-to-3D.")
                complete = gr.Checkbox(True, label="Complete occluded parts of garments",
                                       elem_id="parse-complete")
                run = gr.Button("Parse the current object", variant="primary",
                                interactive=False, elem_id="parse-run")
                labels = gr.CheckboxGroup([], label="Labels shown", elem_id="parse-labels")
                legend = gr.HTML(elem_id="parse-legend")
                skeleton = gr.Checkbox(True, label="Show the skeleton (pose)",
                                       elem_id="parse-skeleton")
                checks = gr.Markdown(elem_id="parse-checks")
                with gr.Row():
                    send_edit = gr.Button("Send this part to Edit", visible=sends,
                                          interactive=False, elem_id="send-edit")
                    send_3d = gr.Button("Send this part to 3D", visible=sends,
                                        interactive=False, elem_id="send-3d")
            with gr.Column(scale=2):
                status = gr.Markdown("Segment the character in the Segment tab, then parse it "
                                     "here.", elem_id="parse-status")
                overlay = gr.Image(label="Parse overlay", interactive=False, format="png",
                                   buttons=["fullscreen"], height=560, elem_id="parse-overlay")
                parts = gr.Gallery(label="Cut-outs (click one for its completed version and "
                                   "downloads)", columns=4, height=220, allow_preview=False,
                                   object_fit="contain", format="png", elem_id="parse-parts")
                with gr.Row():
                    original = gr.Image(label="Cut-out", image_mode="RGBA", interactive=False,
                                        format="png", height=260, elem_id="part-original")
                    completed = gr.Image(label="Completed (occluded part filled in)",
                                         image_mode="RGBA", interactive=False, format="png",
                                         height=260, elem_id="part-completed")
                with gr.Row():
                    part_files = gr.HTML(visible=False, elem_id="part-download")
                    zip_file = gr.HTML(visible=False, elem_id="parts-zip")

    gate.needs_image(run, send_edit, send_3d)
    part_outputs = [original, completed, part_files]
    view_outputs = [pstate, status, overlay, labels, legend, checks, parts, zip_file,
                    *part_outputs]

    def stored(ui: UiState, pui: ParseUi) -> StoredParse | None:
        """The parse shown, if it belongs to the tab's current image."""
        if pui.parse_id is None or pui.session_id != ui.session_id:
            return None
        return parsing.get(pui.session_id, pui.parse_id)

    async def part_view(ui: UiState, pui: ParseUi) -> tuple:
        """The chosen part large, its completed version, and both as files."""
        if pui.part is None:
            return (None, None, hidden_links())
        result = parsing.get(pui.session_id, pui.parse_id).result
        part = next(p for p in result.parts if p.name == pui.part)
        kinds = {"part": ".png"}
        if part.name in result.completed:
            kinds["completed"] = ".completed.png"
        files = {}
        for kind, suffix in kinds.items():
            data, _ = await parsing.asset(pui.session_id, pui.parse_id, kind, part.name)
            files[part.name.lower() + suffix] = data
        offered = await asyncio.to_thread(exports.offer, ui, files)
        return (part.rgba, result.completed.get(part.name), links(offered, "This part (PNG)"))

    async def parse_view(ui: UiState, pui: ParseUi, current: StoredParse) -> tuple:
        """Every output of the tab, for the parse ``current`` that ``pui`` shows."""
        response, result = current.response, current.result
        image = await asyncio.to_thread(render_overlay, ui.image, result, response.labels, True)
        zip_bytes, _ = await parsing.asset(pui.session_id, pui.parse_id, "zip")
        stem = ui.file_stem(f"{pui.object_label}-parts")
        (zipped,) = await asyncio.to_thread(exports.offer, ui, {f"{stem}.zip": zip_bytes})
        gallery = [(part.rgba, _caption(response, i)) for i, part in enumerate(result.parts)]
        names = [part.name for part in result.parts]
        return (
            pui,
            _status(pui, response),
            image,
            gr.update(choices=response.labels, value=response.labels),
            _legend(response.labels),
            _checks(response),
            gr.update(value=gallery,
                      selected_index=names.index(pui.part) if pui.part in names else None),
            links([zipped], "All cut-outs (ZIP)"),
            *await part_view(ui, pui),
        )

    @guarded()
    async def on_parse(ui: UiState, pui: ParseUi, complete_occlusions: bool,
                       progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        if ui.session_id is None or ui.object_id is None:
            gr.Info("Upload an image and segment the character in the Segment tab first.")
            return gr.skip()
        obj = await segmentation.get_object(ui.session_id, ui.object_id)
        if obj.selected is None:
            gr.Info("The current object has no mask yet: click on the character in the Segment "
                    "tab first.")
            return gr.skip()
        request = ParseRequest(object_id=ui.object_id, complete_occlusions=complete_occlusions)
        start = time.monotonic()
        response: ParseResponse = await with_progress(
            parsing.parse(ui.session_id, request),
            lambda: min(0.95, (time.monotonic() - start) / max(parsing.parse_seconds, 1e-3)),
            progress, "Parsing body and garments",
        )
        pui.session_id, pui.parse_id = ui.session_id, response.parse_id
        pui.object_label = ui.label(ui.object_id)
        pui.part = response.parts[0].name if response.parts else None
        return await parse_view(ui, pui, parsing.get(pui.session_id, pui.parse_id))

    @guarded()
    async def on_restore(ui: UiState, pui: ParseUi) -> tuple:
        """The parse shown before a reload, if its session still keeps it."""
        if not ui.reloaded:
            return gr.skip()
        current = None
        with contextlib.suppress(NotFound):  # a session keeps its last few parses only
            current = stored(ui, pui)
        if current is None:
            return gr.skip()
        return await parse_view(ui, pui, current)

    @guarded()
    async def on_toggle(ui: UiState, pui: ParseUi, shown: list[str], show_skeleton: bool):
        current = stored(ui, pui)
        if current is None:
            return gr.skip()
        return await asyncio.to_thread(render_overlay, ui.image, current.result, shown,
                                       show_skeleton)

    @guarded()
    async def on_part(ui: UiState, pui: ParseUi, evt: gr.SelectData) -> tuple:
        current = stored(ui, pui)
        if current is None:
            return gr.skip()
        pui.part = current.response.parts[int(evt.index)].name
        return await part_view(ui, pui)

    events = {**EVENTS, "show_progress_on": [overlay]}
    # Toggling re-draws from the toggles' state when it runs: only the last one of a quick series
    # matters ("always_last"), where the default ("once") would drop a toggle made meanwhile.
    quiet = {**events, "show_progress": "hidden", "trigger_mode": "always_last"}
    run.click(on_parse, [state, pstate, complete], view_outputs, **events)
    for toggle in (labels, skeleton):
        toggle.input(on_toggle, [state, pstate, labels, skeleton], [overlay], **quiet)
    parts.select(on_part, [state, pstate], part_outputs, **quiet)
    return ParseTab(pstate, send_edit, send_3d, Restore(on_restore, [state, pstate], view_outputs))
