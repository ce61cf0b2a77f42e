"""The first screen a person meets, in a real headless Chromium against the real app (tiny
random weights): a title and one line saying the flow, the untrained-weights banner styled as
a warning, examples captioned in words (and as alt text), the objects listed with the colours
the overlay draws them in, and the controls that need an image not clickable until there is
one."""

# ruff: noqa: F811 - the test takes the browser and page fixtures imported below

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from atelier3d.samples import drawn_character, examples
from atelier3d.serve.ui.common import UiState
from tests.test_ui_browser import (  # noqa: F401 - the browser and page fixtures
    TIMEOUT_MS,
    browser,
    fetch_image,
    overlay_src,
    page,
    second_object_by_box,
    segment_with_box,
    tab,
    upload_character,
    wait_status,
)

pytestmark = pytest.mark.browser


def test_the_first_screen_says_what_this_is_and_the_banner_warns(page: Page) -> None:
    intro = page.locator("#intro")
    expect(intro.locator("h1")).to_have_text("atelier3d")
    expect(intro).to_contain_text(
        "Segment an object → separate body & garments → edit it with text → turn it into a "
        "3D asset.")
    banner = page.locator("#weights-banner")
    banner.wait_for(state="visible")
    background, border, colour = banner.evaluate(
        "e => { const s = getComputedStyle(e);"
        " return [s.backgroundColor, s.borderLeftWidth, s.color]; }")
    # A filled, edged box (not the page's plain text), its text dark on the light fill.
    assert background == "rgb(255, 243, 205)", background
    assert border == "6px", border
    text_colour = banner.locator("p").first.evaluate("e => getComputedStyle(e).color")
    assert text_colour == "rgb(77, 58, 0)", (colour, text_colour)


def test_examples_have_captions_and_alt_texts(page: Page) -> None:
    captions = [example.caption for example in examples()]
    items = page.locator("#examples .thumbnail-item")
    expect(items).to_have_count(len(captions))
    # Each thumbnail's caption is shown in words under it, and is its image's alt text.
    expect(page.locator("#examples .caption-label")).to_have_text(captions)
    for i, caption in enumerate(captions):
        expect(items.nth(i).locator("img")).to_have_attribute("alt", caption)
    # Clicking one still opens it in the Segment tab.
    items.nth(captions.index("Anime character, full body")).click()
    wait_status(page, r"Object 1.*384×640 ready")


def test_objects_are_listed_with_their_overlay_colours(page: Page, tmp_path: Path) -> None:
    segment_with_box(page, tmp_path)  # object 1: a box from (90, 30) to (300, 620)
    second_object_by_box(page)  # object 2: a box from (100, 180) to (290, 345)

    swatches = page.locator("#object-legend .swatch")
    expect(swatches).to_have_text(["Object 1", "Object 2"])
    expect(swatches.nth(1)).to_have_attribute("aria-current", "true")  # the one worked on
    ui = UiState(objects=["first", "second"])
    palette = [ui.colour("first"), ui.colour("second")]
    assert palette[0] != palette[1]
    shown = [swatches.nth(i).locator("span").evaluate(
        "e => getComputedStyle(e).backgroundColor") for i in range(2)]
    assert shown == [f"rgb({r}, {g}, {b})" for r, g, b in palette], shown

    # The overlay draws them in those very colours (up to its lossy encoding): each object's
    # box, drawn while it is the one worked on. (Its mask's outline, one pixel wide, loses its
    # colour in the encoding.)
    def near(colour: tuple[int, int, int], box: tuple[slice, slice] = np.s_[:, :]) -> np.ndarray:
        pixels = fetch_image(page, overlay_src(page))[box].astype(int)
        return np.abs(pixels - colour).max(axis=-1) <= 16

    # Columns along the top edge of object 2's box (3 px wide, within these 5 rows).
    assert near(palette[1], np.s_[178:183, 120:270]).any(axis=0).mean() > 0.8
    page.locator("#object-select input").click()
    page.get_by_role("option", name="Object 1").click()
    wait_status(page, r"Object 1 · 0 \+ / 0 − points · box")
    expect(swatches.nth(0)).to_have_attribute("aria-current", "true")
    assert near(palette[0], np.s_[28:33, 110:280]).any(axis=0).mean() > 0.8


# The buttons that need an image, by tab: each does nothing useful before an upload.
NEED_AN_IMAGE = {
    "Segment": ["new-object", "export"],
    "Body & garments": ["parse-run", "send-edit", "send-3d"],
    "Edit": ["edit-run"],
    "3D": ["mesh-run"],
    "Character → 3D": ["character-run"],
    "Recipe": ["recipe-export-run"],
}


def expect_buttons(page: Page, enabled: bool) -> None:
    """Every button that needs an image is enabled (or disabled), tab by tab."""
    for name, buttons in NEED_AN_IMAGE.items():
        tab(page, name).click()
        for button in buttons:
            locator = page.locator(f"#{button}")
            if enabled:
                expect(locator).to_be_enabled(timeout=TIMEOUT_MS)
            else:
                expect(locator).to_be_disabled(timeout=TIMEOUT_MS)
    tab(page, "Segment").click()


def test_controls_that_need_an_image_wait_for_one(page: Page, tmp_path: Path) -> None:
    expect_buttons(page, enabled=False)
    upload_character(page, tmp_path)
    expect_buttons(page, enabled=True)

    # Cleared: disabled again.
    page.locator("#upload button[aria-label='Remove Image']").click()
    wait_status(page, "Upload an image or pick an example to start")
    expect_buttons(page, enabled=False)

    # Refused (a text file named .png), after an accepted one: disabled again.
    upload_character(page, tmp_path)
    expect_buttons(page, enabled=True)
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"hello, I am a PNG\n" * 20)
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    wait_status(page, "Upload an image or pick an example to start")
    expect_buttons(page, enabled=False)

    # The 3D tab meshes an uploaded cut-out without a session: its own upload enables its run
    # (only), and removing it disables it again.
    image = drawn_character()
    alpha = (np.abs(image.astype(int) - image[0, 0]).sum(-1) > 30).astype(np.uint8) * 255
    Image.fromarray(np.dstack([image, alpha])).save(tmp_path / "cutout.png")
    tab(page, "3D").click()
    page.locator("#mesh-upload input[type=file]").set_input_files(str(tmp_path / "cutout.png"))
    expect(page.locator("#mesh-run")).to_be_enabled(timeout=TIMEOUT_MS)
    tab(page, "Edit").click()
    expect(page.locator("#edit-run")).to_be_disabled()
    tab(page, "3D").click()
    page.locator("#mesh-upload button[aria-label='Remove Image']").click()
    expect(page.locator("#mesh-run")).to_be_disabled(timeout=TIMEOUT_MS)
