"""The first screen a person meets, in a real headless Chromium against the real app (tiny
random weights): a title and one line saying the flow, and the untrained-weights banner
styled as a warning."""

# ruff: noqa: F811 - the test takes the browser and page fixtures imported below

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.test_ui_browser import browser, page  # noqa: F401 - the browser and page fixtures

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
