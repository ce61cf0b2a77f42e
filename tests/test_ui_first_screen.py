"""The first screen a person meets, in a real headless Chromium against the real app (tiny
random weights): a title and one line saying the flow, the untrained-weights banner
styled as a warning, and the controls that need an image not clickable until there is one."""

# ruff: noqa: F811 - the test takes the browser and page fixtures imported below

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from atelier3d.samples import drawn_character
from tests.test_ui_browser import (  # noqa: F401 - the browser and page fixtures
    TIMEOUT_MS,
    browser,
    page,
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
