"""The "3D" tab: image-to-3D (Hunyuan3D-2) of a cut-out, an edit, a parse part or an uploaded RGBA
image, as mesh jobs on the server (:class:`atelier3d.serve.mesh.service.MeshService`).

The viewer shows the untextured shape as soon as the job has it (its ``shape`` artifact), then
the finished asset, offered in every format the API converts to, with the time of each stage.
The progress bar sits where the stage times will be, not over the viewer, so the shape is seen
while the asset is finished; where the server projects colours instead of painting them, the
tab says so and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import gradio as gr
import numpy as np

from atelier3d.api.common import ImageSource
from atelier3d.api.mesh import MeshJobRequest, MeshPart
from atelier3d.serve.jobs.types import Job
from atelier3d.serve.mesh.service import MeshService
from atelier3d.serve.sessions.session import StoredParse
from atelier3d.serve.ui.common import (
    EVENTS,
    ExportDir,
    Restore,
    UiState,
    client_key,
    guarded,
    hidden_links,
    links,
    uploaded_file,
)
from atelier3d.serve.ui.parse import ParseUi
from atelier3d.serve.ui.studio import (
    STAGES,
    UPLOAD,
    EditUi,
    MeshRun,
    Picker,
    Studio,
    cancel_button,
    optional,
    outcome,
    seed_and_steps,
    source_of,
    track,
)
from atelier3d.stages.mesh import FORMATS, MIN_BOX_PX, convert_mesh


@dataclass
class MeshTab:
    picker: Picker
    state: gr.State  # MeshRun
    restore: Restore


def layered_parts(stored: StoredParse, parse_id: str) -> tuple[list[MeshPart], list[str]]:
    """One mesh per region of the character: the parse's parts that share no label with an
    earlier one (the garments, then hair and skin, but not the group merging all garments),
    completed where something hid part of them. Also the names of the parts left out for being
    too small to mesh (a few stray pixels of a label)."""
    taken: set[int] = set()
    parts, small = [], []
    for part in stored.result.parts:
        if not taken.isdisjoint(part.labels):
            continue
        x0, y0, x1, y1 = part.box
        if max(x1 - x0, y1 - y0) < MIN_BOX_PX:
            small.append(part.name)
            continue
        taken.update(part.labels)
        source = ImageSource(kind="part", parse_id=parse_id, part=part.name,
                             completed=part.name in stored.result.completed)
        parts.append(MeshPart(name=part.name, source=source))
    return parts, small


def timings(job: Job) -> str:
    rows = [f"| {STAGES.get(stage, stage)} | {ms / 1000:.2f} s |"
            for stage, ms in job.stage_ms.items()]
    total = f"| **Total** | **{job.finished_at - job.started_at:.2f} s** |"
    return "\n".join(["| Stage | Time |", "|---|---:|", *rows, total])


def texture_note(meta: dict) -> str:
    """What the status line says of an asset whose colours were projected where the server
    was asked to paint where it can (``texture: auto``), and why; "" otherwise."""
    why = meta.get("texture_note")
    if meta.get("texture") != "project" or not why:
        return ""
    return ("Colours are projected from the picture (the back mirrors the front), not painted "
            f"by Hunyuan3D-Paint: {why}.")


def all_formats(glb: bytes, stem: str) -> dict[str, bytes]:
    return {f"{stem}.{fmt}": convert_mesh(glb, fmt) for fmt in FORMATS}


def opaque(image: np.ndarray) -> bool:
    """Whether a picked image has nothing transparent: then the server guesses the object (SAM's
    automatic mask: the mesh service's ``_with_alpha``); the cut-outs of objects and parts
    have alpha, the original and edits do not."""
    return image.ndim != 3 or image.shape[2] != 4 or bool((image[..., 3] == 255).all())


OPAQUE = ("The picked image has no transparent background: the server cuts out what it takes "
          "for its main object, which may not be the one you mean. Pick a cut-out (an object "
          "or a part) to choose it yourself.")


def mesh_tab(studio: Studio, meshing: MeshService) -> MeshTab:
    """Builds the tab (inside the caller's ``gr.Tabs``) and its events."""
    jobs, exports = studio.jobs, studio.exports
    with gr.Tab("3D", id="mesh") as tab:
        running = gr.State(MeshRun())
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                source = gr.Dropdown(label="Source (a cut-out: its alpha is the object)",
                                     choices=[], elem_id="mesh-source")
                preview = gr.Image(label="Source image", interactive=False, format="png",
                                   height=200, elem_id="mesh-preview")
                # Its events take the upload undecoded (preprocess=False): see uploaded_file.
                upload = gr.Image(label="…or upload an RGBA cut-out", type="filepath",
                                  image_mode=None, format="png", sources=["upload", "clipboard"],
                                  height=200, elem_id="mesh-upload")
                layered = gr.Checkbox(False, label="Layered asset: one mesh (and GLB node) per "
                                      "part of the Body & garments parse", elem_id="mesh-layered")
                with gr.Accordion("Parameters", open=False, elem_id="mesh-parameters"):
                    seed, steps = seed_and_steps("mesh")
                    octree = gr.Number(0, label="Octree resolution (0: the server's)",
                                       precision=0, minimum=0, elem_id="mesh-octree")
                    faces = gr.Number(0, label="Target faces (0: the server's)",
                                      precision=0, minimum=0, elem_id="mesh-faces")
                    texture = gr.Checkbox(True, label="Texture", elem_id="mesh-texture")
                with gr.Row():
                    run = gr.Button("Make the 3D asset", variant="primary", interactive=False,
                                    elem_id="mesh-run")
                    cancel = gr.Button("Cancel", interactive=False, elem_id="mesh-cancel")
                status = gr.Markdown("Pick a cut-out (or upload one), then run.",
                                     elem_id="mesh-status")
                # Also where the job's progress shows (room for its bar), clear of the viewer
                stage_times = gr.Markdown(elem_id="mesh-timings", min_height=48)
            with gr.Column(scale=2):
                viewer = gr.Model3D(label="3D asset", height=520, elem_id="mesh-viewer")
                downloads = gr.HTML(visible=False, elem_id="mesh-download")
    picker = Picker("mesh", source, extra=(("Uploaded image (below)", UPLOAD),))
    studio.gate.needs_image(run, own=upload)  # an uploaded cut-out needs no session
    studio.link(picker, tab, preview)
    studio.link_cancel(cancel, running, "3D job")
    outputs = [viewer, downloads, stage_times, status, cancel]

    async def job_request(ui: UiState, pui: ParseUi, eui: EditUi, key: str | None,
                          upload: dict | None, as_layers: bool, params: dict
                          ) -> tuple[MeshJobRequest, bytes | None, str, str] | None:
        """The request, the uploaded image, what the asset is made of (for what the tab shows)
        and its downloads' name; None, after saying what is missing, when there is nothing to
        make a mesh of."""
        if as_layers:
            stored = studio.shown_parse(ui, pui)
            if stored is None:
                gr.Info("Parse the character in the Body & garments tab first: a layered asset "
                        "has one mesh per part.")
                return None
            parts, small = layered_parts(stored, pui.parse_id)
            if small:
                gr.Info(f"Left out, too small to mesh: {', '.join(small)}.")
            if not parts:
                return None
            body = MeshJobRequest(session_id=ui.session_id, parts=parts, **params)
            return body, None, f"{len(parts)} parts, layered", ui.file_stem("layered")
        if key == UPLOAD:
            uploaded = uploaded_file(upload)
            if uploaded is None:
                gr.Info("Upload an RGBA image (a cut-out) first.")
                return None
            return (MeshJobRequest(**params), await asyncio.to_thread(uploaded.read),
                    "the uploaded image", uploaded.stem.lower())
        if ui.session_id is None or key is None:
            gr.Info("Segment something in the Segment tab first, or upload a cut-out here.")
            return None
        body = MeshJobRequest(session_id=ui.session_id, source=source_of(key), **params)
        if opaque(await asyncio.to_thread(studio.image, ui, key)):
            gr.Warning(OPAQUE)
        what = await studio.label(ui, pui, eui, key)
        return body, None, what, ui.file_stem(source_stem(what))

    async def follow(ui: UiState, run: MeshRun, progress: gr.Progress) -> AsyncIterator[tuple]:
        """Follows ``run``'s job: the shape in the viewer when it has it, then the asset, its
        downloads and stage times (as it was run, or after a reload found it running)."""
        job = jobs.get(run.job_id)
        yield (None, hidden_links(), "", f"Making a 3D asset of {run.what}…", cancel_button(True))
        async for event in track(jobs, job, progress):
            if event["type"] == "artifact" and event["name"] == "shape":
                (shape,) = await asyncio.to_thread(
                    exports.write, {f"{run.stem}.shape.glb": job.artifacts["shape"].data})
                yield (shape, gr.skip(), gr.skip(), "The shape is ready; finishing the asset…",
                       gr.skip())
        failed = outcome(job, "3D job")
        if failed is not None:
            yield gr.skip(), gr.skip(), gr.skip(), failed, cancel_button(False)
            return
        yield await finished(ui, run, job)

    async def finished(ui: UiState, run: MeshRun, job: Job) -> tuple:
        files = await asyncio.to_thread(all_formats, job.result.data, run.stem)
        offered = await asyncio.to_thread(offer, exports, ui, job, files)
        glb = next(file for file in offered if file.name.endswith(".glb"))
        note = f"**3D asset of {run.what}** · done in {job.finished_at - job.started_at:.1f} s"
        projected = texture_note(job.result.meta)
        if projected:
            note = f"{note}\n\n{projected}"
        return (str(glb.path), links(offered, "Downloads"), timings(job), note,
                cancel_button(False))

    @guarded(lock=False)  # a mesh takes a while: the tab's other events must not wait
    async def on_run(ui: UiState, pui: ParseUi, eui: EditUi, run: MeshRun, key: str | None,
                     upload: dict | None, as_layers: bool, seed_value: float | None,
                     steps_value: float | None, octree_value: float | None,
                     faces_value: float | None, with_texture: bool, request: gr.Request,
                     progress: gr.Progress = gr.Progress(),  # noqa: B008
                     ) -> AsyncIterator[tuple]:
        params = {"seed": int(seed_value or 0), "steps": optional(steps_value),
                  "octree_resolution": optional(octree_value),
                  "target_face_count": optional(faces_value), "texture": with_texture}
        found = await job_request(ui, pui, eui, key, upload, as_layers, params)
        if found is None:
            yield gr.skip()
            return
        body, image, run.what, run.stem = found
        job = await meshing.submit(body, client_key(request), upload=image)
        run.job_id = job.job_id
        async for update in follow(ui, run, progress):
            yield update

    @guarded(lock=False)
    async def on_restore(ui: UiState, run: MeshRun,
                         progress: gr.Progress = gr.Progress()  # noqa: B008
                         ) -> AsyncIterator[tuple]:
        """After a reload: the 3D job of before, followed again if it runs, else its result."""
        job = studio.running_job(run) if ui.reloaded else None
        if job is None:
            yield gr.skip()
        elif not job.finished:
            async for update in follow(ui, run, progress):
                yield update
        elif job.status == "succeeded":
            yield await finished(ui, run, job)
        else:
            yield gr.skip(), gr.skip(), gr.skip(), outcome(job, "3D job"), cancel_button(False)

    @guarded()
    async def on_upload(ui: UiState, pui: ParseUi, eui: EditUi, payload: dict | None) -> dict:
        if uploaded_file(payload) is None:
            return gr.skip()
        return await studio.picker_update(picker, ui, pui, eui, UPLOAD)

    run.click(on_run, [*studio.states, running, source, upload, layered, seed, steps, octree,
                       faces, texture], outputs, **EVENTS, show_progress_on=[stage_times],
              preprocess=False)  # the upload undecoded (see uploaded_file); the rest as sent
    upload.upload(on_upload, [*studio.states, upload], [source], **EVENTS, preprocess=False)
    return MeshTab(picker, running, Restore(on_restore, [studio.state, running], outputs,
                                            progress_on=[stage_times]))


def source_stem(label: str) -> str:
    """A picked source's label as a file name part: "Object 1 cut-out" -> "object1"."""
    words = label.replace(" cut-out", "").replace(" · ", "-").replace("(completed)", "completed")
    return "".join(c for c in words.lower() if c.isalnum() or c == "-").strip("-") or "mesh"


def offer(exports: ExportDir, ui: UiState, job: Job, files: dict[str, bytes]) -> list:
    """The asset's files offered to ``ui``'s browser, going with the job's session (the tab's
    own, for an uploaded image's asset, made outside any session)."""
    session_id = job.session_id or ui.session_id
    offered = exports.offer(ui, files)
    for file in offered:
        file.session_id = session_id
    return offered

