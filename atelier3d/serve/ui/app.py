"""The Gradio UI: a "Segment" tab that calls the SegmentService in-process, then the
"Body & garments" tab (:mod:`atelier3d.serve.ui.parse`), and the "Edit" and "3D" tabs
(:mod:`atelier3d.serve.ui.edit`, :mod:`atelier3d.serve.ui.mesh`), all on the same session.

Sessions, objects and their undo history live on the server (the same state the /v1 API uses), so
every view is re-rendered from the ``ObjectState`` the service returns. The per-tab ``gr.State``
only holds what the server does not: the ids, the image (to draw overlays), and the first corner
of a box that is being drawn. Those states are the browser's workspace (:mod:`.workspace`): the
page's load event puts them back after a reload, and each tab shows again what it showed,
following a job that still runs.
"""

from __future__ import annotations

import logging

import gradio as gr
from fastapi import FastAPI, Request
from starlette.routing import Match, Mount
from starlette.types import Scope

from atelier3d.errors import Unavailable
from atelier3d.serve.auth import ui_login
from atelier3d.serve.character.service import CharacterService
from atelier3d.serve.health import Health
from atelier3d.serve.parse.service import ParseService
from atelier3d.serve.recipe.service import RecipeService
from atelier3d.serve.routes import JobServices
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.ui.character import character_tab
from atelier3d.serve.ui.common import EVENTS, ExportDir, ImageGate, Restore, UiState, guarded
from atelier3d.serve.ui.edit import edit_tab
from atelier3d.serve.ui.mesh import mesh_tab
from atelier3d.serve.ui.parse import ParseTab, ParseUi, parse_tab
from atelier3d.serve.ui.recipe import recipe_tab
from atelier3d.serve.ui.segment import segment_tab
from atelier3d.serve.ui.studio import EditUi, MeshRun, Studio, edit_source
from atelier3d.serve.ui.workspace import (
    UiCookieMiddleware,
    Workspaces,
    build_files_router,
    cookie_token,
)

logger = logging.getLogger("ray.serve")

# The first thing a person reads: what this is, and the flow the tabs follow.
INTRO = ("# atelier3d\n"
         "Segment an object → separate body & garments → edit it with text → turn it into a "
         "3D asset. Each tab starts from what the one before made.")
UNTRAINED_BANNER = "⚠️ **Running with untrained (random) weights – masks are meaningless**"
# While the server pulls weights the banner says how far (/readyz's words), refreshed this often.
LOADING_BANNER = "⏳ The model weights are on disk; the models are loading."
BANNER_POLL_S = 2.0

CSS = ("#overlay img { cursor: crosshair; } .a3d-hidden { display: none !important; }"
       # A warning that reads as one (the untrained-weights banner), in light and dark themes.
       # (!important: Gradio's block styles are more specific than one class)
       " .a3d-warning { background: #fff3cd !important; border: 1px solid #f0c36d !important;"
       " border-left: 6px solid #d99a00 !important; border-radius: 6px; padding: 4px 12px; }"
       " .a3d-warning * { color: #4d3a00 !important; }"
       # The object being worked on, in the Segment tab's list of objects.
       " #object-legend .swatch[aria-current] { font-weight: 700; }")

# The Segment tab's in-browser decoder and its keyboard shortcuts (atelier3d/serve/ui/static/).
HEAD = ('<script type="module" src="/ui-static/segment_browser.js"></script>'
        '<script type="module" src="/ui-static/segment_keys.js"></script>')


def build_ui(health: Health, service: SegmentService, workspaces: Workspaces,
             parsing: ParseService | None = None, jobs: JobServices | None = None,
             character: CharacterService | None = None) -> gr.Blocks:
    """The Segment tab, then Body & garments (with ``parsing``), then Edit and 3D (with
    ``jobs``, which need ``parsing`` too: their sources include the parse's parts)."""
    if jobs is not None and parsing is None:
        raise ValueError("the Edit and 3D tabs need the parsing service")
    exports = workspaces.exports
    weights: dict[str, str] = {}  # cached answer of health.ready(): weights never change

    with gr.Blocks(title="atelier3d", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        banner = gr.Markdown(visible=False, elem_id="weights-banner",
                             elem_classes=["a3d-warning"])
        state = gr.State(UiState())
        gate = ImageGate(state)
        # The states the load event joins to the browser's workspace, in Workspace's order.
        states: list[gr.State | None] = [state, None, None, None]
        restores: list[Restore] = []
        if jobs is not None:
            # Here, not in the Edit tab: both job tabs use it, and a gr.Tabs takes only tabs.
            states[2] = gr.State(EditUi())
        with gr.Tabs() as tabs:
            with gr.Tab("Segment", id="segment"):
                restores.append(segment_tab(service, state, exports, gate))
            if parsing is not None:
                parse = parse_tab(parsing, state, exports, gate, sends=jobs is not None)
                states[1] = parse.state
                restores.append(parse.restore)
            if jobs is not None:
                states[3], job_restores = _job_tabs(service, parsing, jobs, exports, tabs,
                                                    [state, parse.state, states[2]], parse,
                                                    gate, character)
                restores += job_restores
                with gr.Tab("Recipe", id="recipe"):
                    recipe_tab(RecipeService(service, parsing, *jobs, health), state, exports,
                               gate)
        gate.link()

        poll = gr.Timer(BANNER_POLL_S, active=False)

        async def show_banner() -> tuple[dict, gr.Timer]:
            """The banner, and whether to poll again: while weights download or models load."""
            downloading = await health.downloading()
            if downloading:
                return gr.update(visible=True, value=f"⏳ {downloading}"), gr.Timer(active=True)
            if "weights" not in weights:
                try:
                    weights["weights"] = (await health.ready()).weights
                except Unavailable:
                    # Pulled, the replicas now load: no toast every poll, the banner says so.
                    return gr.update(visible=True, value=LOADING_BANNER), gr.Timer(active=True)
            untrained = weights["weights"] == "untrained"
            return (gr.update(visible=untrained, value=UNTRAINED_BANNER if untrained else ""),
                    gr.Timer(active=False))

        # Each tab's state in Workspace's order; a tab left out still has one, unused.
        page = [given if given is not None else gr.State(empty) for given, empty in
                zip(states, (None, ParseUi(), EditUi(), MeshRun()), strict=True)]

        @guarded()  # under the Segment tab's lock: an upload already running ends first
        async def on_load(ui: UiState, pui: ParseUi, eui: EditUi, run: MeshRun,
                          request: gr.Request) -> tuple:
            workspace = workspaces.of(cookie_token({"cookie": request.headers.get("cookie")}),
                                      getattr(request, "username", None))
            workspaces.join(workspace, ui, pui, eui, run)
            return await show_banner()

        def unchanged(_: UiState | None) -> tuple[dict, dict]:
            return gr.skip(), gr.skip()

        @guarded(unchanged)
        async def on_poll() -> tuple[dict, gr.Timer]:
            return await show_banner()

        load = demo.load(on_load, page, [banner, poll], **EVENTS, show_progress="hidden")
        poll.tick(on_poll, None, [banner, poll], **EVENTS, show_progress="hidden")
        # Each tab shows again what it showed, side by side: a tab following a job for minutes
        # must not hold up the others.
        for restore in restores:
            load.then(restore.fn, restore.inputs, restore.outputs, **EVENTS,
                      show_progress_on=restore.progress_on)
    return demo


def _job_tabs(service: SegmentService, parsing: ParseService, jobs: JobServices,
              exports: ExportDir, tabs: gr.Tabs, states: list[gr.State], parse: ParseTab,
              gate: ImageGate, character: CharacterService | None = None
              ) -> tuple[gr.State, list[Restore]]:
    """The Edit and 3D tabs, and the buttons that send images to them from the tabs before;
    ``states``: the Segment, Body & garments and Edit tabs' states. Returns the 3D tab's state
    and both tabs' restores."""
    job_service, editing, meshing = jobs
    studio = Studio(service, parsing, job_service, editing.resolver, exports, tabs, *states,
                    gate)
    edit = edit_tab(studio, editing)
    mesh = mesh_tab(studio, meshing)
    if character is not None:
        character_tab(studio, character)
    unparsed = "Parse the character and click a part first."
    studio.link_send(parse.send_edit, edit.picker, studio.shown_part, unparsed)
    studio.link_send(parse.send_3d, mesh.picker, studio.shown_part, unparsed)
    studio.link_send(edit.to_3d, mesh.picker,
                     lambda ui, pui, eui: edit_source(eui.shown) if eui.shown else None,
                     "Run an edit (or pick one from the history) first.")
    return mesh.state, [edit.restore, mesh.restore]


class _UiMount(Mount):
    """The UI's mount at ``/``, except under ``/v1/``.

    A mount at ``/`` matches every path, so an unknown ``/v1`` path would get Gradio's 404 and a
    wrong method on a ``/v1`` route a 404 instead of a 405, both outside the API's error format.
    Not matching there lets FastAPI's router answer as it did before the UI was mounted.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            return Match.NONE, {}
        return super().matches(scope)


def mount_ui(app: FastAPI, health: Health, service: SegmentService,
             parsing: ParseService | None = None, jobs: JobServices | None = None,
             character: CharacterService | None = None) -> FastAPI:
    """Mounts the UI at ``/``; routes already on ``app`` (/v1, /docs, /healthz) match first."""
    config = service.config
    workspaces = Workspaces(service, ExportDir())
    demo = build_ui(health, service, workspaces, parsing, jobs, character)
    # Gradio serves only the files its events returned (copied into its cache, deleted after
    # an hour by delete_cache): no allowed_paths (tests/test_auth.py checks that the weights
    # cache, the tree and system files are not served). Not blocked_paths on the cache folder
    # too: with it, two quick undos in the Segment tab never rendered (test_ui_browser, every
    # run; cause inside Gradio not pinned down), without it they do.
    # With auth.ui_users, those files, the queue and the config all need the login.
    app = gr.mount_gradio_app(
        app, demo, path="/", footer_links=[], ssr_mode=False, css=CSS, head=HEAD,
        max_file_size=config.limits.max_upload_bytes, allowed_paths=[],
        auth=ui_login(config.auth.ui_users),
        auth_message="atelier3d: sign in" if config.auth.ui_users else None,
    )
    mount = app.router.routes[-1]  # mount_gradio_app appends its Mount last
    if not isinstance(mount, Mount) or mount.path != "":
        raise RuntimeError(f"expected Gradio's mount at / as the last route, found {mount!r}")
    gradio_app = mount.app
    app.router.routes[-1] = _UiMount("/", app=gradio_app, name=mount.name)

    def user_of(request: Request) -> str | None:
        """The UI login's user of a request, as Gradio's own routes find it."""
        token = (request.cookies.get(f"access-token-{gradio_app.cookie_id}")
                 or request.cookies.get(f"access-token-unsecure-{gradio_app.cookie_id}"))
        return gradio_app.tokens.get(token) if token else None

    # Before the UI's mount, which matches every other path.
    files = build_files_router(workspaces, user_of)
    app.router.routes[-1:-1] = files.routes
    app.add_middleware(UiCookieMiddleware)
    return app
