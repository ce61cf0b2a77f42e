"""The "Recipe" tab: this session's recipe as a download, and a recipe replayed on its image
(a new session; its edits and meshes are followed to the end and offered as files)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from atelier3d.api.recipe import Recipe
from atelier3d.errors import BadRequest
from atelier3d.serve.recipe.service import RecipeService
from atelier3d.serve.ui.common import (
    EVENTS,
    ExportDir,
    ImageGate,
    UiState,
    client_key,
    guarded,
    links,
)

SUFFIXES = {"edit": "png", "mesh": "glb"}


def recipe_tab(recipes: RecipeService, state: gr.State, exports: ExportDir,
               gate: ImageGate) -> None:
    gr.Markdown("A recipe is how this session's masks, parses, edits and 3D assets were made, "
                "with the exact models. Replayed on the same image by a server with the same "
                "models, it gives the same results.")
    with gr.Row():
        export = gr.Button("Export this session's recipe", interactive=False,
                           elem_id="recipe-export-run")
        exported = gr.HTML(visible=False, elem_id="recipe-export")
    with gr.Row():
        recipe_file = gr.File(label="Recipe to replay (JSON)", file_types=[".json"],
                              type="filepath", elem_id="recipe-upload")
        image_file = gr.File(label="Its image", file_types=["image"], type="filepath",
                             elem_id="recipe-image")
    replay = gr.Button("Replay", variant="primary")  # a new session: needs no image here
    gate.needs_image(export)
    summary = gr.Markdown(elem_id="recipe-summary")
    results = gr.HTML(visible=False, elem_id="recipe-results")

    @guarded()
    async def on_export(ui: UiState) -> dict:
        if ui.session_id is None:
            raise BadRequest("upload an image in the Segment tab first")
        recipe = await recipes.export(ui.session_id)
        data = recipe.model_dump_json(exclude_none=True, indent=1).encode()
        return links(exports.offer(ui, {f"{ui.image_name}.recipe.json": data}), "Recipe")

    @guarded(lock=False)  # it follows the replayed jobs: the tab's other events must not wait
    async def on_replay(ui: UiState, recipe_path: str | None, image_path: str | None,
                        request: gr.Request):
        if not recipe_path or not image_path:
            raise BadRequest("choose a recipe and its image")
        recipe = Recipe.model_validate_json(Path(recipe_path).read_bytes())
        replayed = await recipes.replay(recipe, Path(image_path).read_bytes(),
                                        client_key(request))
        lines = [f"Replayed as session `{replayed.session_id}`."]
        if replayed.mismatched_masks:
            lines.append("These objects' masks came out differently: "
                         + ", ".join(replayed.mismatched_masks))
        kinds = {job.job_id: job.kind for job in recipe.jobs}
        yield "\n\n".join(lines + ["Running its jobs…"]), gr.skip()
        files = {}
        for recorded, job_id in replayed.jobs.items():
            job = await recipes.jobs.wait(job_id)
            lines.append(f"{kinds[recorded]} `{recorded}`: {job.status}")
            if job.status == "succeeded":
                files[f"{recorded}.{SUFFIXES[kinds[recorded]]}"] = recipes.jobs.result(job_id).data
        yield "\n\n".join(lines), links(exports.offer(ui, files), "Replayed results")

    export.click(on_export, [state], [exported], **EVENTS)
    replay.click(on_replay, [state, recipe_file, image_file], [summary, results], **EVENTS)
