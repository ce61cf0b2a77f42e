"""The Gradio UI in a real headless Chromium against the real app (tiny random weights).

Upload the drawn character, wait for the encode, click on the figure, check the overlay and the
three scored candidates, download the cut-out, and drive objects, undo/redo, boxes and the
candidate choice. Masks from random weights are meaningless, so the checks are about the UI:
where the click landed, what was drawn, what the files contain.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    expect,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from atelier3d.samples import drawn_character
from atelier3d.serve.ui.parse import FADE
from atelier3d.stages.parse import GARMENT_LABELS, LABELS

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 180_000  # 2 shared cores: encodes and page loads can be slow
SCREENSHOT = Path("/tmp/ui_segment.png")
SHIRT = (192, 265)  # image coordinates on the drawn character's shirt (384x640)
SKIRT = (192, 400)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def server_clicks(context: BrowserContext) -> BrowserContext:
    """Clicks go through the server (the Segment tab's fallback when the browser runtime cannot
    load): these tests drive the UI's server path; tests/test_segment_browser.py drives the
    browser-decoded one."""
    # Not by routing the runtime's files away: with a route on the context, Chromium cancelled
    # the page's downloads.
    context.add_init_script("Object.defineProperty(window, 'WebAssembly', {value: undefined})")
    return context


@contextlib.contextmanager
def opened(browser: Browser, server: str, server_side_clicks: bool = True) -> Iterator[Page]:
    """The UI in a new browser context, loaded; clicks through the server or the page."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    if server_side_clicks:
        server_clicks(context)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server, timeout=TIMEOUT_MS)
    for selector in ("#upload input[type=file]", "#status", "#overlay", "#candidates", "#export"):
        page.wait_for_selector(selector, state="attached")
    try:
        yield page
    finally:
        context.close()


@pytest.fixture()
def page(browser: Browser, server: str) -> Iterator[Page]:
    with opened(browser, server) as page:
        yield page


def tab(page: Page, name: str) -> Locator:
    return page.get_by_role("tab", name=name, exact=True)


def status(page: Page) -> str:
    return page.locator("#status").inner_text()


def wait_status(page: Page, pattern: str) -> str:
    """Waits until the status line matches the regex ``pattern`` and returns it."""
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#status')?.innerText ?? '')", arg=pattern,
        timeout=TIMEOUT_MS,
    )
    return status(page)


def overlay_src(page: Page) -> str:
    """The overlay's image URL once the browser has loaded it (clicks before that are lost)."""
    page.wait_for_function(
        "() => { const i = document.querySelector('#overlay img');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=TIMEOUT_MS,
    )
    return page.locator("#overlay img").get_attribute("src")


def second_object_by_box(page: Page) -> str:
    """A second object, defined by a box drawn with two clicks from (100, 180) to (290, 345);
    returns the status line."""
    page.locator("#new-object").click()
    wait_status(page, r"Object 2: click on the image")
    page.get_by_label("box corner").check()
    click_image(page, 100, 180)
    wait_status(page, r"opposite corner")
    click_image(page, 290, 345)
    return wait_status(page, r"Object 2 · 0 \+ / 0 − points · box")


def fetch_image(page: Page, src: str) -> np.ndarray:
    response = page.request.get(src, timeout=TIMEOUT_MS)
    assert response.ok, response.status
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def click_image(page: Page, x: float, y: float) -> None:
    """Clicks the overlay at image pixel (x, y), undoing the display's scaling and centring."""
    overlay_src(page)
    img = page.locator("#overlay img")
    img.scroll_into_view_if_needed()
    offset = img.evaluate(
        """(i, [x, y]) => {
            const r = i.getBoundingClientRect();
            const s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight, 1);
            return {x: (r.width - i.naturalWidth * s) / 2 + x * s,
                    y: (r.height - i.naturalHeight * s) / 2 + y * s};
        }""",
        [x, y],
    )
    img.click(position=offset)


def upload_character(page: Page, tmp_path: Path) -> None:
    """Uploads the drawn character and waits for its encode, which must show a progress bar."""
    path = tmp_path / "character.png"
    Image.fromarray(drawn_character()).save(path)
    # The encode may take under a second: record the progress text whenever it shows, however
    # briefly, instead of hoping to catch it on screen.
    page.evaluate("""() => {
        window.encodeProgressSeen = false;
        new MutationObserver(() => {
            const text = document.querySelector('#overlay')?.textContent ?? '';
            if (text.includes('Encoding the image')) window.encodeProgressSeen = true;
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#upload input[type=file]").set_input_files(str(path))
    wait_status(page, r"Object 1.*384×640 ready")
    assert page.evaluate("window.encodeProgressSeen"), "no progress bar while encoding"


def segment_with_box(page: Page, tmp_path: Path) -> None:
    """Object 1: the drawn character, from a box around it."""
    upload_character(page, tmp_path)
    page.get_by_label("box corner").check()
    click_image(page, 90, 30)
    wait_status(page, r"opposite corner")
    click_image(page, 300, 620)
    wait_status(page, r"Object 1 · 0 \+ / 0 − points · box .*score")


def download(page: Page, elem_id: str) -> tuple[str, bytes]:
    link = page.locator(f"#{elem_id} a[download]").first
    link.wait_for()
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        link.click()
    return info.value.suggested_filename, Path(info.value.path()).read_bytes()


def captions(page: Page) -> list[str]:
    return page.locator("#candidates .caption-label").all_inner_texts()


def test_banner_says_the_weights_are_random(page: Page) -> None:
    banner = page.locator("#weights-banner")
    banner.wait_for(state="visible")
    assert "untrained (random) weights" in banner.inner_text()
    assert "masks are meaningless" in banner.inner_text()


def test_segment_click_overlay_candidates_and_cutout(page: Page, tmp_path: Path) -> None:
    # Before any image, actions that need one cannot be clicked.
    expect(page.locator("#export")).to_be_disabled()

    upload_character(page, tmp_path)
    before = fetch_image(page, overlay_src(page))
    assert before.shape == (640, 384, 3)  # shown at full resolution, so clicks map to pixels
    assert np.abs(before.astype(int) - drawn_character()).mean() < 3  # no mask drawn yet

    click_image(page, *SHIRT)
    text = wait_status(page, r"1 \+ / 0 − points .*score")
    assert re.search(r"mask [123]/3 \(score -?\d\.\d{3}\)", text), text
    after = fetch_image(page, overlay_src(page))
    # A green (positive) marker sits where we clicked; the selected mask tints the image.
    r, g, b = after[SHIRT[1], SHIRT[0]].astype(int)
    assert g > 150 and r < 80 and b < 80, (r, g, b)
    assert np.abs(after.astype(int) - before).mean() > 5

    # Three candidates, each captioned with its score; the chosen one is ticked.
    page.wait_for_function("document.querySelectorAll('#candidates .caption-label').length == 3")
    labels = captions(page)
    assert all(re.fullmatch(r"#\d score -?\d\.\d{3}( ✓)?", label) for label in labels), labels
    assert sum("✓" in label for label in labels) == 1
    chosen = next(i for i, label in enumerate(labels) if "✓" in label)

    # Choosing another candidate changes the overlay and the status.
    other = (chosen + 1) % 3
    page.locator("#candidates .thumbnail-item").nth(other).click()
    wait_status(page, rf"mask {other + 1}/3")
    assert "✓" in captions(page)[other]
    assert overlay_src(page) is not None

    # Cut-out: a transparent PNG of the chosen mask, and the mask as RLE JSON.
    page.locator("#export").click()
    name, data = download(page, "cutout-download")
    assert name.endswith(".png")
    cutout = Image.open(io.BytesIO(data))
    assert cutout.format == "PNG" and cutout.mode == "RGBA"
    alpha = np.asarray(cutout)[..., 3]
    assert (alpha == 0).any() and (alpha == 255).any()
    name, data = download(page, "rle-download")
    mask = json.loads(data)
    assert name.endswith(".json")
    assert mask["rle"]["size"] == [640, 384] and isinstance(mask["rle"]["counts"], str)
    assert mask["area"] == int((alpha == 255).sum())  # the cut-out is exactly that mask
    page.screenshot(path=str(SCREENSHOT), full_page=True)  # for a person to look at


def test_objects_undo_redo_and_box(page: Page, tmp_path: Path) -> None:
    upload_character(page, tmp_path)
    click_image(page, *SHIRT)
    wait_status(page, r"Object 1 · 1 \+ / 0 − points")
    page.get_by_label("remove (−)").check()
    click_image(page, *SKIRT)
    wait_status(page, r"Object 1 · 1 \+ / 1 − points")

    # Undo/redo re-render from the server's history.
    page.locator("#undo").click()
    wait_status(page, r"Object 1 · 1 \+ / 0 − points")
    page.locator("#redo").click()
    wait_status(page, r"Object 1 · 1 \+ / 1 − points")

    text = second_object_by_box(page)
    assert "score" in text
    overlay = fetch_image(page, overlay_src(page))
    # The box is outlined in object 2's colour (tomato) along its top edge.
    top = overlay[178:183, 120:270].reshape(-1, 3).astype(int)
    assert ((top[:, 0] > 200) & (top[:, 1] < 140)).mean() > 0.5

    # Switching back restores object 1's own prompts.
    page.locator("#object-select input").click()
    page.get_by_role("option", name="Object 1").click()
    wait_status(page, r"Object 1 · 1 \+ / 1 − points")

    # Reset empties it as an undoable step; a click after it starts afresh (nothing to refine).
    page.locator("#reset").click()
    wait_status(page, r"Object 1: click on the image")
    expect(page.locator("#reset")).to_be_disabled(timeout=TIMEOUT_MS)
    page.get_by_label("add (+)").check()
    click_image(page, *SKIRT)
    wait_status(page, r"Object 1 · 1 \+ / 0 − points")
    page.locator("#undo").click()
    wait_status(page, r"Object 1: click on the image")
    page.locator("#undo").click()
    wait_status(page, r"Object 1 · 1 \+ / 1 − points")
    # Quick repeated clicks are all applied, in order: none is dropped while one is pending.
    page.locator("#undo").click()
    page.locator("#undo").click()
    wait_status(page, r"Object 1: click on the image")
    expect(page.locator("#undo")).to_be_disabled(timeout=TIMEOUT_MS)
    expect(page.locator("#redo")).to_be_enabled(timeout=TIMEOUT_MS)


def test_api_routes_survive_the_ui_mount(http) -> None:
    """The UI is mounted at / last: the API's own routes and error format still answer."""
    assert http.get("/healthz").json() == {"status": "ok"}
    assert "swagger" in http.get("/docs").text.lower()
    assert "/v1/sessions" in http.get("/openapi.json").json()["paths"]
    assert "gradio" in http.get("/").text.lower()
    unknown = http.get("/v1/no-such-route")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = http.put("/v1/sessions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


# ---- the "Body & garments" tab ----------------------------------------------------------------

PARSE_SCREENSHOT = Path("/tmp/ui_parse.png")


def wait_text(page: Page, selector: str, pattern: str) -> str:
    try:
        page.wait_for_function(
            "([s, p]) => new RegExp(p).test(document.querySelector(s)?.innerText ?? '')",
            arg=[selector, pattern], timeout=TIMEOUT_MS,
        )
    except PlaywrightTimeout:
        shown = page.evaluate("s => document.querySelector(s)?.innerText", selector)
        toasts = page.locator("[data-testid=toast-text]").all_inner_texts()
        raise AssertionError(f"{selector} never matched {pattern!r}; it shows {shown!r}; "
                             f"messages: {toasts}") from None
    return page.locator(selector).inner_text()


def loaded_src(page: Page, selector: str, previous: str | None = None) -> str:
    """The URL of the image in ``selector`` once loaded (and different from ``previous``)."""
    page.wait_for_function(
        "([s, prev]) => { const i = document.querySelector(s + ' img');"
        " return i && i.complete && i.naturalWidth > 0 && i.getAttribute('src') !== prev; }",
        arg=[selector, previous], timeout=TIMEOUT_MS,
    )
    return page.locator(f"{selector} img").first.get_attribute("src")


def wait_overlay(page: Page, condition) -> np.ndarray:
    """The parse overlay once ``condition(image)`` holds (toggles re-draw it one by one)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        image = fetch_image(page, loaded_src(page, "#parse-overlay"))
        if condition(image):
            return image
        assert time.monotonic() < deadline, "the overlay never showed what was expected"
        time.sleep(0.3)


def test_body_and_garments_tab(page: Page, tmp_path: Path) -> None:
    parse_tab = tab(page, "Body & garments")
    parse_tab.click()
    expect(page.locator("#parse-run")).to_be_disabled()  # before any image

    # Segment the character with a box in the Segment tab, then parse its object here.
    tab(page, "Segment").click()
    segment_with_box(page, tmp_path)
    parse_tab.click()
    page.evaluate("""() => {
        window.parseProgressSeen = false;
        new MutationObserver(() => {
            const text = document.querySelector('#parse-overlay')?.textContent ?? '';
            if (text.includes('Parsing body and garments')) window.parseProgressSeen = true;
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#parse-run").click()
    text = wait_text(page, "#parse-status", r"Object 1 parsed: \d+ labels, \d+ parts")
    n_labels, n_parts = (int(v) for v in re.search(r"(\d+) labels, (\d+) parts", text).groups())
    assert n_labels > 0 and n_parts > 0
    assert page.evaluate("window.parseProgressSeen"), "no progress bar while parsing"

    # The overlay: the image with the labels tinted (and the skeleton drawn).
    src = loaded_src(page, "#parse-overlay")
    tinted = fetch_image(page, src)
    assert tinted.shape == (640, 384, 3)
    assert np.abs(tinted.astype(int) - drawn_character()).mean() > 5
    boxes = page.locator("#parse-labels input[type=checkbox]")
    assert boxes.count() == n_labels and all(boxes.nth(i).is_checked() for i in range(n_labels))
    assert page.locator("#parse-legend .swatch").count() == n_labels
    # Label toggles and the skeleton toggle re-draw it. With nothing shown, each pixel is the
    # image's own (the character) or faded to white (the rest): nothing is tinted or drawn.
    image = drawn_character()
    faded = np.round(image * np.float32(1 - FADE) + np.float32(255 * FADE)).astype(np.uint8)

    def tinted_pixels(overlay: np.ndarray) -> int:
        return int((~(np.all(overlay == image, -1) | np.all(overlay == faded, -1))).sum())

    for i in range(n_labels):
        boxes.nth(i).uncheck()
    page.locator("#parse-skeleton input").uncheck()
    plain = wait_overlay(page, lambda o: tinted_pixels(o) == 0)
    assert 0.05 < np.all(plain == image, -1).mean() < 0.95
    boxes.nth(0).check()  # one label tinted again
    one = tinted_pixels(wait_overlay(
        page, lambda o: 0 < tinted_pixels(o) < np.all(plain == image, -1).sum()))
    if "keypoints" in text:  # the skeleton comes back on top
        page.locator("#parse-skeleton input").check()
        wait_overlay(page, lambda o: tinted_pixels(o) > one)

    # The gallery of cut-outs; the first is shown large and offered as a file.
    thumbs = page.locator("#parse-parts .thumbnail-item")
    expect(thumbs).to_have_count(n_parts)
    names = page.locator("#parse-parts .caption-label").all_inner_texts()
    assert len(names) == n_parts and all(names)
    loaded_src(page, "#part-original")
    name, data = download(page, "part-download")
    first = names[0].split(" · ")[0]
    assert name == f"{first.lower()}.png"
    part = Image.open(io.BytesIO(data))
    assert part.format == "PNG" and part.mode == "RGBA"
    assert (np.asarray(part)[..., 3] > 0).any()
    name, data = download(page, "parts-zip")
    assert name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = set(archive.namelist())
        manifest = json.loads(archive.read("parts.json"))
    assert [p["name"] for p in manifest["parts"]] == [n.split(" · ")[0] for n in names]
    assert {f"{p['name']}.png" for p in manifest["parts"]} <= members
    # Choosing another part (one with a completed version, if any) shows it and offers its files.
    index = max((i for i, n in enumerate(names) if n.endswith("completed")), default=n_parts - 1)
    if index > 0:
        thumbs.nth(index).click()
        chosen = names[index].split(" · ")[0].lower()
        files = [f"{chosen}.png"]
        if names[index].endswith("completed"):
            files.append(f"{chosen}.completed.png")
            assert f"{names[index].split(' · ')[0]}.completed.png" in members
        page.wait_for_function(
            "names => { const got = [...document.querySelectorAll('#part-download a[download]')]"
            ".map(a => a.getAttribute('download')); "
            "return names.every(n => got.includes(n)) && got.length == names.length; }",
            arg=files, timeout=TIMEOUT_MS)
        if len(files) == 2:
            completed = fetch_image(page, loaded_src(page, "#part-completed"))
            assert completed.shape[0] > 1 and completed.shape[1] > 1

    # The checks, each passed or failed with its reason (and a suggestion when failed).
    checks = wait_text(page, "#parse-checks", "Checks before 3D")
    lines = [line for line in checks.splitlines() if line.strip().startswith(("✓", "✗"))]
    assert len(lines) == 4, checks
    assert any("Full body visible" in line for line in lines)
    assert all("suggestion" in line for line in lines if line.strip().startswith("✗"))
    page.screenshot(path=str(PARSE_SCREENSHOT), full_page=True)

    # "Send to Edit" / "Send to 3D" open those tabs with the part shown here as their source.
    shown = names[index].split(" · ")[0]
    expected = f"Parts: Object 1 · {shown}" + (
        " (completed)" if names[index].endswith("completed") else "")
    for button, name, picker in (("send-edit", "Edit", "edit-source"),
                                 ("send-3d", "3D", "mesh-source")):
        parse_tab.click()
        page.locator(f"#{button}").click()
        expect(tab(page, name)).to_have_attribute(
            "aria-selected", "true")
        wait_picked(page, picker, expected)


# ---- the "Edit" and "3D" tabs -----------------------------------------------------------------

EDIT_SCREENSHOT = Path("/tmp/ui_edit.png")
EDIT_STEPS = 3
MESH_SCREENSHOT = Path("/tmp/ui_mesh.png")
# Enough that the bar, which shows only the latest report every few ms, counts several steps.
MESH_STEPS = 12
MESH_STAGES = ["Conditioning", "Denoising", "Decoding the volume", "Extracting the mesh",
               "Post-processing", "Texturing"]


def wait_picked(page: Page, elem_id: str, label: str) -> None:
    """Waits until the source dropdown ``elem_id`` shows the choice ``label``."""
    page.wait_for_function(
        "([id, label]) => document.querySelector(`#${id} input`)?.value === label",
        arg=[elem_id, label], timeout=TIMEOUT_MS,
    )


def until_kept(change: Callable[[], None], kept: Callable[[], bool], what: str) -> None:
    """Changes an input, again until it holds: on a loaded machine Gradio sometimes puts an
    input's earlier value back a moment after it was changed."""
    for _ in range(5):
        change()
        time.sleep(1)
        if kept():
            return
    raise AssertionError(f"{what} does not keep its new value")


def set_number(page: Page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input")

    def change() -> None:
        box.fill(str(value))
        box.press("Tab")

    until_kept(change, lambda: box.input_value() == str(value), f"#{elem_id}")


def record_progress(page: Page, elem_id: str) -> None:
    """Records every text the progress bar shown on ``#elem_id`` has, however briefly, in
    ``window.progress[elem_id]`` (its ``aria-valuetext``: "<desc>: <percent>%")."""
    page.evaluate("""id => {
        window.progress = window.progress ?? {};
        const seen = window.progress[id] = [];
        new MutationObserver(() => {
            const bar = document.querySelector(`#${id} [role=progressbar]`);
            const text = bar?.getAttribute('aria-valuetext');
            if (text && seen[seen.length - 1] !== text) seen.push(text);
        }).observe(document.body, {subtree: true, childList: true, characterData: true,
                                   attributes: true});
    }""", elem_id)


def progress_texts(page: Page, elem_id: str) -> list[str]:
    return page.evaluate("id => window.progress[id]", elem_id)


def assert_real_progress(texts: list[str], stages: list[str], steps: int, least: int) -> None:
    """The bar showed at least ``least`` of the job's ``stages``, in their order, counted the
    denoising steps (the pipeline's own loop, ``steps`` of them) one by one, and ended full.
    Gradio sends only the latest progress every few milliseconds, so a quick stage or step
    followed at once by the next may not show."""
    joined = "\n".join(texts)
    firsts = [next((i for i, t in enumerate(texts) if t.startswith(stage)), None)
              for stage in stages]
    shown = [i for i in firsts if i is not None]
    assert len(shown) >= least and shown == sorted(shown), (stages, joined)
    counted = [tuple(map(int, m.groups())) for t in texts
               if (m := re.match(r"Denoising (\d+)/(\d+)", t))]
    assert {total for _, total in counted} == {steps}, joined
    done = [step for step, _ in counted]
    assert len(set(done)) >= 2 and done == sorted(done), joined
    assert texts[-1] == "Succeeded: 100%", joined
    percents = [int(re.search(r"(\d+)%$", t).group(1)) for t in texts]
    assert percents == sorted(percents), joined


def image_sources(page: Page, selector: str) -> list[str]:
    """The URLs of every image in ``selector`` once all are loaded."""
    page.wait_for_function(
        "s => { const all = [...document.querySelectorAll(s + ' img')];"
        " return all.length > 0 && all.every(i => i.complete && i.naturalWidth > 0); }",
        arg=selector, timeout=TIMEOUT_MS,
    )
    return [img.get_attribute("src") for img in page.locator(f"{selector} img").all()]


def test_edit_tab_runs_presets_keeps_a_history_and_branches(page: Page, tmp_path: Path) -> None:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    tab(page, "Edit").click()
    expect(page.locator("#edit-run")).to_be_disabled()  # before any image

    tab(page, "Segment").click()
    segment_with_box(page, tmp_path)
    tab(page, "Edit").click()
    # The current object's cut-out is the default source, previewed with its transparency.
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    cutout = np.asarray(Image.open(io.BytesIO(page.request.get(
        loaded_src(page, "#edit-preview")).body())))
    assert cutout.shape[2] == 4 and (cutout[..., 3] == 0).any() and (cutout[..., 3] > 0).any()

    # A preset edit: the progress bar follows the job's stages and steps up to 100%.
    page.locator("#edit-parameters").click()
    set_number(page, "edit-steps", EDIT_STEPS)  # the tiny random pipeline: ~1 s per step
    record_progress(page, "edit-compare")
    page.locator("#edit-run").click()
    wait_text(page, "#edit-status", r"Edit 1 · full_body ← Object 1 cut-out · done in")
    assert_real_progress(progress_texts(page, "edit-compare"),
                         ["Encoding", "Denoising", "Decoding"], EDIT_STEPS, least=3)
    before, after = (fetch_image(page, src) for src in image_sources(page, "#edit-compare"))
    assert before.shape[:2] == cutout.shape[:2]  # the source, beside the result
    assert after.ndim == 3 and min(after.shape[:2]) >= 16
    thumbs = page.locator("#edit-history .thumbnail-item")
    expect(thumbs).to_have_count(1)
    first = page.locator("#edit-history .caption-label").first.inner_text()
    assert first == "Edit 1 · full_body ← Object 1 cut-out"
    expect(page.locator("#edit-to-3d")).to_be_enabled()

    # Branch: go back to Edit 1 in the history (it becomes the source) and edit it freely.
    tab(page, "Segment").click()
    tab(page, "Edit").click()  # the picker refreshes on opening
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    thumbs.first.click()
    wait_picked(page, "edit-source", f"Edits: {first}")
    wait_text(page, "#edit-status", "the source of the next edit")
    preset = page.locator("#edit-preset input")
    until_kept(lambda: (preset.click(), page.get_by_role("option", name="Free").click()),
               lambda: preset.input_value() == "Free", "the preset")
    prompt = page.locator("#edit-prompt textarea")
    until_kept(lambda: prompt.fill("make the shirt red"),
               lambda: prompt.input_value() == "make the shirt red", "the prompt")
    page.locator("#edit-run").click()
    label = "Edit 2 · free “make the shirt red” ← Edit 1"
    try:
        wait_text(page, "#edit-status", re.escape(label) + " · done in")
    except AssertionError as failed:
        raise AssertionError(f"{failed}; page errors: {errors[-5:]}") from None
    expect(thumbs).to_have_count(2)
    assert page.locator("#edit-history .caption-label").all_inner_texts() == [first, label]
    # Its "before" is Edit 1's result, pixel for pixel.
    before, _ = (fetch_image(page, src) for src in image_sources(page, "#edit-compare"))
    edit_1 = fetch_image(page, image_sources(page, "#edit-history")[0])
    assert before.shape == edit_1.shape and np.array_equal(before, edit_1)
    page.screenshot(path=str(EDIT_SCREENSHOT), full_page=True)

    # "Use this for 3D" opens the 3D tab with the edit shown as its source.
    page.locator("#edit-to-3d").click()
    expect(tab(page, "3D")).to_have_attribute(
        "aria-selected", "true")
    wait_picked(page, "mesh-source", f"Edits: {label}")
    loaded_src(page, "#mesh-preview")


def model_urls(page: Page) -> None:
    """Records every model the 3D viewer was given, in ``window.models``, and in
    ``window.modelsCovered`` whether a progress overlay lay over the viewer when it got it (the
    job still runs when it gets the untextured shape: an overlay there would hide it)."""
    page.evaluate("""() => {
        const seen = window.models = [];
        const covered = window.modelsCovered = [];
        new MutationObserver(() => {
            const link = document.querySelector('#mesh-viewer [data-testid=model3d-download-link]');
            const href = link?.getAttribute('href');
            if (href && seen[seen.length - 1] !== href) {
                seen.push(href);
                covered.push(!!document.querySelector('#mesh-viewer [role=progressbar]'));
            }
        }).observe(document.body, {subtree: true, childList: true, attributes: true});
    }""")


def wait_drawn(canvas: Locator) -> None:
    """Waits until the viewer's canvas shows something: not one flat colour (the viewer loads
    and frames a new model over a few frames)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        drawn = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
        if drawn.reshape(-1, 3).std(axis=0).max() > 5:
            return
        assert time.monotonic() < deadline, "the 3D viewer never drew the model"
        time.sleep(0.5)


def check_glb(data: bytes) -> trimesh.Scene:
    """A well-formed binary glTF 2 with at least one triangle."""
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    scene = trimesh.load(io.BytesIO(data), file_type="glb", force="scene")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 0
    return scene


def test_3d_tab_meshes_a_cutout_shows_it_and_offers_downloads(page: Page,
                                                               tmp_path: Path) -> None:
    segment_with_box(page, tmp_path)
    tab(page, "3D").click()
    wait_picked(page, "mesh-source", "Objects: Object 1 cut-out")
    loaded_src(page, "#mesh-preview")

    page.locator("#mesh-parameters").click()
    set_number(page, "mesh-steps", MESH_STEPS)  # the tiny random Hunyuan3D
    set_number(page, "mesh-octree", 64)
    # The bar shows where the stage times will be, clear of the viewer.
    record_progress(page, "mesh-timings")
    record_progress(page, "mesh-viewer")
    model_urls(page)
    page.locator("#mesh-run").click()
    wait_text(page, "#mesh-status", r"3D asset of Object 1 cut-out · done in")
    # texture: auto on the CPU: the tab says the colours are projected, not painted, and why
    expect(page.locator("#mesh-status")).to_contain_text(
        "Colours are projected from the picture (the back mirrors the front), not painted by "
        "Hunyuan3D-Paint: this server's mesh model runs on the CPU")
    texts = progress_texts(page, "mesh-timings")
    assert_real_progress(texts, MESH_STAGES, MESH_STEPS, least=4)
    # The volume decode reports from inside (20 steps); the bar shows several of them.
    assert len({t for t in texts if re.match(r"Decoding the volume \d+/20", t)}) >= 2, texts
    # The untextured shape showed first, then the finished asset; nothing lay over the viewer
    # while the job ran, so the shape was there to see before the coloured one.
    models = page.evaluate("window.models")
    assert page.evaluate("window.modelsCovered") == [False] * len(models)
    assert progress_texts(page, "mesh-viewer") == []
    # Named after the image and the source (the upload was character.png).
    assert models[0].endswith("character-object1.shape.glb"), models
    assert models[-1].endswith("character-object1.glb"), models
    check_glb(page.request.get(models[-1]).body())
    # The viewer drew it: its canvas is not one flat colour.
    canvas = page.locator("#mesh-viewer canvas")
    # The viewer makes a new canvas for each model it is given (the shape, then the asset).
    expect(canvas).to_have_count(1, timeout=TIMEOUT_MS)
    wait_drawn(canvas)

    # Downloads: GLB, and the API's conversions of it.
    links = page.locator("#mesh-download a[download]")
    expect(links).to_have_count(4)
    names = {links.nth(i).get_attribute("download") for i in range(4)}
    assert names == {f"character-object1.{fmt}" for fmt in ("glb", "obj", "ply", "stl")}
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.locator("#mesh-download a[download='character-object1.glb']").click()
    glb = check_glb(Path(info.value.path()).read_bytes())
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.locator("#mesh-download a[download='character-object1.obj']").click()
    obj = trimesh.load(info.value.path(), file_type="obj", force="mesh")
    assert len(obj.faces) == sum(len(g.faces) for g in glb.geometry.values())

    # Each stage's time, and the total.
    table = wait_text(page, "#mesh-timings", "Total")
    for stage in ("Conditioning", "Denoising", "Decoding the volume", "Extracting the mesh"):
        assert re.search(rf"{stage}\s+\d+\.\d\d s", table), table
    page.screenshot(path=str(MESH_SCREENSHOT), full_page=True)

    # Cancel: a long run stops at its next step. Cancel is offered only while a job runs, and
    # a new job clears the last one's downloads and times.
    expect(page.locator("#mesh-cancel")).to_be_disabled()
    set_number(page, "mesh-steps", 150)
    record_progress(page, "mesh-timings")
    page.locator("#mesh-run").click()
    expect(page.locator("#mesh-download a[download]")).to_have_count(0)
    expect(page.locator("#mesh-timings")).not_to_contain_text("Total")
    wait_text(page, "#mesh-status", "Making a 3D asset of Object 1 cut-out")
    page.wait_for_function("() => window.progress['mesh-timings'].some("
                           "t => t.startsWith('Denoising'))", timeout=TIMEOUT_MS)
    page.locator("#mesh-cancel").click()
    wait_text(page, "#mesh-status", "The 3D job was cancelled")
    expect(page.locator("#mesh-cancel")).to_be_disabled()
    steps = [int(m.group(1)) for t in progress_texts(page, "mesh-timings")
             if (m := re.match(r"Denoising (\d+)/150", t))]
    # The status above says it was cancelled before the end: during denoising, or at the
    # volume decode where the tiny model's 150 steps outran the click.
    assert steps


def test_3d_tab_layered_asset_from_the_parse_and_an_uploaded_cutout(page: Page,
                                                                    tmp_path: Path) -> None:
    segment_with_box(page, tmp_path)
    tab(page, "Body & garments").click()
    page.locator("#parse-run").click()
    wait_text(page, "#parse-status", r"Object 1 parsed: \d+ labels, \d+ parts")
    captions = page.locator("#parse-parts .caption-label").all_inner_texts()
    parts = {caption.split(" · ")[0] for caption in captions}

    # Layered: one GLB node per part, leaving out the group that merges the garments.
    tab(page, "3D").click()
    page.locator("#mesh-parameters").click()
    set_number(page, "mesh-steps", MESH_STEPS)
    set_number(page, "mesh-octree", 64)
    layered = page.locator("#mesh-layered input")
    until_kept(layered.check, layered.is_checked, "the layered box")
    model_urls(page)
    record_progress(page, "mesh-timings")
    page.locator("#mesh-run").click()
    wait_text(page, "#mesh-status", r"3D asset of \d+ parts, layered · done in")
    # The bar says which part runs: "Denoising 4/6 · part 2/2".
    texts = progress_texts(page, "mesh-timings")
    assert any(re.search(r" · part [2-9]\d*/\d+", t) for t in texts), texts
    scene = check_glb(page.request.get(page.evaluate("window.models")[-1]).body())
    nodes = set(scene.graph.nodes_geometry)
    garments = {LABELS[i] for i in GARMENT_LABELS}
    assert nodes and nodes <= parts, (nodes, parts)
    assert "clothing" not in nodes or not nodes & garments, nodes

    # An uploaded cut-out: an RGB image is refused (it says why), an RGBA one is meshed.
    until_kept(layered.uncheck, lambda: not layered.is_checked(), "the layered box")
    image = drawn_character()
    alpha = (np.abs(image.astype(int) - image[0, 0]).sum(-1) > 30).astype(np.uint8) * 255
    Image.fromarray(image).save(tmp_path / "flat.png")
    Image.fromarray(np.dstack([image, alpha])).save(tmp_path / "cutout.png")
    upload = page.locator("#mesh-upload input[type=file]")
    upload.set_input_files(str(tmp_path / "flat.png"))
    wait_picked(page, "mesh-source", "Uploaded image (below)")
    page.locator("#mesh-run").click()
    page.locator("[data-testid=toast-text]", has_text="no alpha channel").first.wait_for()
    page.locator("#mesh-upload button[aria-label='Remove Image']").click()
    upload.set_input_files(str(tmp_path / "cutout.png"))
    model_urls(page)
    page.locator("#mesh-run").click()
    wait_text(page, "#mesh-status", r"3D asset of the uploaded image · done in")
    assert len(check_glb(page.request.get(page.evaluate("window.models")[-1]).body()).geometry) == 1


def start_long_edit(page: Page, steps: int) -> None:
    """Runs an edit of ``steps`` steps from the Edit tab's picked source, until it denoises."""
    page.locator("#edit-parameters").click()
    set_number(page, "edit-steps", steps)
    record_progress(page, "edit-compare")
    page.locator("#edit-run").click()
    page.wait_for_function("() => (window.progress['edit-compare'] ?? []).some("
                           "t => t.startsWith('Denoising'))", timeout=TIMEOUT_MS)


def test_one_persons_long_edit_never_blocks_anothers_clicks(browser: Browser, server: str,
                                                            page: Page, tmp_path: Path) -> None:
    """Two people at once: while A's long edit runs, B uploads and clicks, and gets masks.
    (The UI's events have no Gradio concurrency limit; the edit waits in its own job queue.)"""
    segment_with_box(page, tmp_path)
    tab(page, "Edit").click()
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    start_long_edit(page, 100)

    other = server_clicks(browser.new_context(viewport={"width": 1400, "height": 1100}))
    try:
        b = other.new_page()
        b.set_default_timeout(TIMEOUT_MS)
        b.goto(server, timeout=TIMEOUT_MS)
        b.wait_for_selector("#upload input[type=file]", state="attached")
        upload_character(b, tmp_path)
        click_image(b, *SHIRT)
        wait_status(b, r"Object 1 · 1 \+ / 0 − points.*score")
        # A's edit is still going: B was served in the middle of it, not after it.
        steps = [int(m.group(1)) for t in progress_texts(page, "edit-compare")
                 if (m := re.match(r"Denoising (\d+)/100", t))]
        assert steps and max(steps) < 100
        assert "done in" not in page.locator("#edit-status").inner_text()
    finally:
        other.close()
    page.locator("#edit-cancel").click()
    wait_text(page, "#edit-status", "cancelled")


def test_edit_tab_sends_the_region_painted_over_the_source(page: Page, tmp_path: Path) -> None:
    """A stroke painted on the Edit tab's region reaches the server as the edit's mask: the
    result names the region the editor repainted, where the stroke was drawn."""
    segment_with_box(page, tmp_path)
    tab(page, "Edit").click()
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    cutout = np.asarray(Image.open(io.BytesIO(page.request.get(
        loaded_src(page, "#edit-preview")).body())))
    region = page.locator("#edit-region")
    canvas = region.locator("canvas").first
    canvas.wait_for()
    region.get_by_role("button", name="Brush", exact=True).first.click()
    box = canvas.bounding_box()
    # A horizontal stroke across the middle of the canvas, where the cut-out is drawn.
    y = box["y"] + box["height"] * 0.5
    page.mouse.move(box["x"] + box["width"] * 0.4, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=12)
    page.mouse.up()
    page.locator("#edit-parameters").click()
    set_number(page, "edit-steps", 2)
    page.locator("#edit-run").click()
    text = wait_text(page, "#edit-status", r"done in .* repainted \d+ px")
    found = re.search(r"repainted (\d+) px in x (\d+)–(\d+), y (\d+)–(\d+)", text)
    assert found, text
    pixels, x0, x1, y0, y1 = (int(v) for v in found.groups())
    h, w = cutout.shape[:2]
    # A band across the middle: nowhere near the top or bottom of the source.
    assert pixels > 0 and 0 < x0 < x1 <= w and h * 0.25 < y0 < y1 < h * 0.75, (text, (h, w))


def test_edit_tab_dresses_the_character_with_a_reference_image(page: Page,
                                                               tmp_path: Path) -> None:
    """A garment uploaded beside the source goes with the edit: the server runs its
    multi-image pipeline on both."""
    segment_with_box(page, tmp_path)
    tab(page, "Edit").click()
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    coat = np.full((160, 128, 3), 120, np.uint8)
    coat[20:150, 24:104] = (30, 60, 160)
    Image.fromarray(coat).save(tmp_path / "coat.png")
    page.locator("#edit-reference input[type=file]").set_input_files(str(tmp_path / "coat.png"))
    page.locator("#edit-reference img").first.wait_for()
    page.locator("#edit-parameters").click()
    set_number(page, "edit-steps", 2)
    set_number(page, "edit-width", 256)
    set_number(page, "edit-height", 256)
    page.locator("#edit-run").click()
    wait_text(page, "#edit-status", r"done in .* multi-image pipeline")
