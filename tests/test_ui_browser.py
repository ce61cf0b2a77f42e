"""The Gradio UI in a real headless Chromium against the real app (tiny random weights).

Upload the drawn character, wait for the encode, click on the figure, check the overlay and the
three scored candidates, download the cut-out, and drive objects, undo/redo, boxes and the
candidate choice. Masks from random weights are meaningless, so the checks are about the UI:
where the click landed, what was drawn, what the files contain.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from atelier3d.samples import drawn_character
from atelier3d.serve.ui_parse import FADE

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


@pytest.fixture()
def page(browser: Browser, server: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server, timeout=TIMEOUT_MS)
    for selector in ("#upload input[type=file]", "#status", "#overlay", "#candidates", "#export"):
        page.wait_for_selector(selector, state="attached")
    yield page
    context.close()


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
    # Before any image, actions explain themselves instead of failing.
    page.locator("#export").click()
    toast = page.locator("[data-testid=toast-text]", has_text="Upload an image")
    toast.first.wait_for()

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

    # A second object, defined by a box drawn with two clicks.
    page.locator("#new-object").click()
    wait_status(page, r"Object 2: click on the image")
    page.get_by_label("box corner").check()
    click_image(page, 100, 180)
    wait_status(page, r"opposite corner")
    click_image(page, 290, 345)
    text = wait_status(page, r"Object 2 · 0 \+ / 0 − points · box")
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
    page.wait_for_function(
        "([s, p]) => new RegExp(p).test(document.querySelector(s)?.innerText ?? '')",
        arg=[selector, pattern], timeout=TIMEOUT_MS,
    )
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
    parse_tab = page.get_by_role("tab", name="Body & garments")
    parse_tab.click()
    page.locator("#parse-run").click()
    page.locator("[data-testid=toast-text]", has_text="Upload an image").first.wait_for()
    # The later stages show, disabled, and say they are pending.
    for elem_id, stage in (("send-edit", "edit"), ("send-3d", "3D")):
        expect(page.locator(f"#{elem_id}")).to_be_disabled()
        assert f"{stage} stage pending" in page.locator(f"#{elem_id}").inner_text()

    # Segment the character with a box in the Segment tab, then parse its object here.
    page.get_by_role("tab", name="Segment").click()
    upload_character(page, tmp_path)
    page.get_by_label("box corner").check()
    click_image(page, 90, 30)
    wait_status(page, r"opposite corner")
    click_image(page, 300, 620)
    wait_status(page, r"Object 1 · 0 \+ / 0 − points · box .*score")
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
