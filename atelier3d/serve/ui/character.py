"""The "Character → 3D" tab: the whole journey as one job (``CharacterService``) on the character
segmented in the Segment tab, its stages listed as they run, the layered asset in a viewer.

Each stage's result is an ordinary parse, edit or mesh of the session, so the other tabs open
and change them; the API's ``resume_from`` runs the journey again from any stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import gradio as gr

from atelier3d.api.character import CHARACTER_STAGES, CharacterJobRequest
from atelier3d.serve.character.service import GARMENTS, CharacterService
from atelier3d.serve.jobs.types import Job
from atelier3d.serve.ui.common import EVENTS, UiState, client_key, guarded
from atelier3d.serve.ui.studio import Studio, outcome, track

STAGE_NAMES = {"parse": "Parse the character", "complete": "Complete the garments",
               "t_pose": "T-pose", "checks": "Pre-3D checks", "mesh": "Layered 3D asset"}


def stage_lines(events: list[dict]) -> str:
    """The stages as a list: done, running or waiting, with what each made."""
    reached = {e["stage"]: e for e in events if e["type"] == "progress"}
    made: dict[str, list[dict]] = {}
    for event in events:
        if event["type"] == "artifact":
            made.setdefault(event["meta"].get("stage", event["name"]), []).append(event["meta"])
    lines = []
    for stage in CHARACTER_STAGES:
        if stage in made:
            notes = [("reused" if m.get("reused") else "skipped" if m.get("skipped") else
                      m.get("garment") or m.get("job_id") or m.get("parse_id") or "done")
                     for m in made[stage]]
            lines.append(f"- ✓ {STAGE_NAMES[stage]} ({', '.join(map(str, notes))})")
        elif stage in reached:
            last = reached[stage]
            lines.append(f"- … {STAGE_NAMES[stage]} ({last['step']}/{last['total']})")
        else:
            lines.append(f"- {STAGE_NAMES[stage]}")
    progress = events[-1]["progress"] if events else 0.0
    return f"**{progress:.0%}**\n\n" + "\n".join(lines)


def character_tab(studio: Studio, character: CharacterService) -> None:
    """Builds the tab (inside the caller's ``gr.Tabs``) and its one event."""
    jobs, exports = studio.jobs, studio.exports
    with gr.Tab("Character → 3D", id="character"):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                garments = gr.CheckboxGroup(list(GARMENTS), label="Garments to complete (each "
                                            "its own node)", elem_id="character-garments")
                t_pose = gr.Checkbox(False, label="Edit to a front T-pose full body first",
                                     elem_id="character-t-pose")
                run = gr.Button("Character to 3D", variant="primary", interactive=False,
                                elem_id="character-run")
                stages = gr.Markdown("Segment the character in the Segment tab, then run.",
                                     elem_id="character-stages")
            with gr.Column(scale=2):
                viewer = gr.Model3D(label="Layered asset", height=480,
                                    elem_id="character-viewer")

    studio.gate.needs_image(run)

    async def shown(job: Job) -> str:
        (glb,) = await asyncio.to_thread(exports.write,
                                         {f"character-{job.job_id[:12]}.glb": job.result.data})
        return glb

    @guarded(lock=False)  # minutes: the tab's other events must not wait
    async def on_run(ui: UiState, chosen: list[str], with_t_pose: bool, request: gr.Request,
                     progress: gr.Progress = gr.Progress(),  # noqa: B008
                     ) -> AsyncIterator[tuple]:
        if ui.session_id is None or ui.object_id is None:
            gr.Info("Segment the character in the Segment tab first.")
            yield gr.skip(), gr.skip()
            return
        body = CharacterJobRequest(object_id=ui.object_id, garments=chosen or [],
                                   t_pose=with_t_pose)
        job = await character.submit(ui.session_id, body, client_key(request))
        seen: list[dict] = []
        async for event in track(jobs, job, progress):
            seen.append(event)
            yield stage_lines(seen), gr.skip()
        failed = outcome(job, "character job")
        if failed is not None:
            yield f"{stage_lines(seen)}\n\n{failed}", gr.skip()
            return
        yield stage_lines(seen), await shown(job)

    run.click(on_run, [studio.state, garments, t_pose], [stages, viewer], **EVENTS,
              show_progress_on=[viewer])
