"""The UI's hold on a person's work, in a real headless Chromium against the real app (tiny
random weights): a reload in the middle of a job and after it finds the image, the objects, the
parse, the edit history and the job again; refused uploads read as the API's plain sentences;
the files offered for download are served only to their browser, and only while their session
lasts."""

# ruff: noqa: F811 - the tests take the browser and page fixtures imported below

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from atelier3d.serve.ui.common import sentence
from tests.test_hostile import declared_png, encoded, frames
from tests.test_ui_browser import (  # noqa: F401 - the browser and page fixtures
    TIMEOUT_MS,
    browser,
    opened,
    segment_with_box,
    start_long_edit,
    tab,
    upload_character,
    wait_picked,
    wait_status,
    wait_text,
)

pytestmark = pytest.mark.browser


@pytest.fixture()
def page(browser, server: str):
    with opened(browser, server, server_side_clicks=False) as page:  # the UI's default
        yield page


def hostile_uploads() -> dict[str, bytes]:
    """File name -> bytes: the uploads of tests/test_hostile.py that the API refuses."""
    png = encoded(Image.fromarray(np.full((48, 40, 3), 120, np.uint8)), "PNG")
    first, second = frames()
    return {
        "notes.png": b"hello, I am a PNG\n" * 20,  # text named .png: 415
        "truncated.png": png[:60],  # cut short: 400
        "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\xff" * 200,  # a PNG signature on garbage
        "icon.png": encoded(Image.fromarray(np.zeros((64, 64, 3), np.uint8)), "ICO"),  # 415
        "animated.gif": encoded(first, "GIF", save_all=True, append_images=[second]),  # 400
        "bomb.png": declared_png(2500, 2500),  # over the pixel limit, from the header: 413
        "sliver.png": encoded(Image.fromarray(np.full((1, 3000, 3), 9, np.uint8)), "PNG"),
    }


def api_refusal(server: str, name: str, data: bytes) -> str:
    """What the API answers the same upload: its 4xx error message."""
    r = httpx.post(f"{server}/v1/sessions", files={"image": (name, data)}, timeout=60)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    return r.json()["error"]["message"]


def test_refused_uploads_read_as_the_apis_plain_sentences(
        page: Page, server: str, tmp_path: Path) -> None:
    upload = page.locator("#upload input[type=file]")
    for name, data in hostile_uploads().items():
        expected = sentence(api_refusal(server, name, data))
        path = tmp_path / name
        path.write_bytes(data)
        upload.set_input_files(str(path))
        toast = page.locator("[data-testid=toast-text]", has_text=expected)
        toast.first.wait_for()
        text = toast.first.inner_text()
        # A sentence, the API's own, with nothing of the server in it.
        assert text[0].isupper() and text.rstrip().endswith((".", ")")), text
        for internal in ("/tmp", "gradio", "Traceback", "Error:", "preprocess", "on_image"):
            assert internal not in text, (name, text)
        # No bare "Error" badge anywhere, and the refused image is cleared.
        assert page.get_by_text(re.compile(r"^\s*Error\s*$")).count() == 0, name
        expect(page.locator("#upload img")).to_have_count(0)
        wait_status(page, "Upload an image or pick an example to start")
        for close in page.locator("[data-testid=toast-close]").all():
            close.click()
    # The 3D tab's own upload too: a text file named .png reads as the API's sentence.
    notes = tmp_path / "notes.png"
    tab(page, "3D").click()
    page.locator("#mesh-upload input[type=file]").set_input_files(str(notes))
    wait_picked(page, "mesh-source", "Uploaded image (below)")
    page.locator("#mesh-run").click()
    expected = sentence(api_refusal(server, "notes.png", notes.read_bytes()))
    text = page.locator("[data-testid=toast-text]", has_text=expected).first.inner_text()
    assert "/tmp" not in text and "gradio" not in text, text
    tab(page, "Segment").click()

    # A photo over the pixel limit (4 MP here) is offered to be scaled down to fit, and then used.
    side = np.linspace(0, 255, 2100, dtype=np.uint8)
    big = np.dstack([np.tile(side, (2000, 1))] * 3)
    (tmp_path / "big.png").write_bytes(encoded(Image.fromarray(big), "PNG"))
    upload.set_input_files(str(tmp_path / "big.png"))
    page.locator("[data-testid=toast-text]", has_text="Downscale it to fit").first.wait_for()
    expect(page.locator("#upload img")).to_have_count(0)
    page.locator("#downscale").click()
    text = wait_status(page, r"Object 1: .*image \d+×\d+ ready in")
    width, height = (int(v) for v in re.search(r"image (\d+)×(\d+)", text).groups())
    assert width * height <= 4_000_000 and abs(width / height - 2100 / 2000) < 0.01, text
    expect(page.locator("#downscale")).to_be_hidden()


# Server-side clicks: a page without the browser decoder is ready sooner, so the upload ran
# before the page's load event had joined it to its workspace; the load event then swapped the
# workspace's state objects in, the upload wrote the page's back, and the cut-out's download
# answered 404 to its owner (Workspaces.join keeps the page's objects since).
@pytest.mark.parametrize("server_side_clicks", [False, True], ids=["in-page", "server-clicks"])
def test_reload_mid_job_and_after_finds_the_work_and_downloads_stay_private(
        browser: Browser, server: str, tmp_path: Path, server_side_clicks: bool) -> None:
    with opened(browser, server, server_side_clicks=server_side_clicks) as page:
        reload_mid_job_and_after(page, browser, server, tmp_path)


def reload_mid_job_and_after(page: Page, browser: Browser, server: str, tmp_path: Path) -> None:
    segment_with_box(page, tmp_path)
    tab(page, "Body & garments").click()
    page.locator("#parse-run").click()
    parsed = wait_text(page, "#parse-status", r"Object 1 parsed: \d+ labels, \d+ parts")

    # The cut-out offered for download: named after the image and the object, served to this
    # browser only (another browser, or no cookie at all, gets a 404).
    tab(page, "Segment").click()
    page.locator("#export").click()
    link = page.locator("#cutout-download a[download]").first
    link.wait_for()
    assert link.get_attribute("download") == "character-object1.png"
    url = urljoin(page.url, link.get_attribute("href"))
    mine = page.request.get(url)
    assert mine.ok and mine.body().startswith(b"\x89PNG")
    assert httpx.get(url, timeout=60).status_code == 404
    stranger = browser.new_context()
    try:
        stranger.new_page().goto(server, timeout=TIMEOUT_MS)  # with a cookie of its own
        assert stranger.request.get(url).status == 404
    finally:
        stranger.close()

    # A long edit, then a reload in the middle of it.
    tab(page, "Edit").click()
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    expect(page.locator("#edit-cancel")).to_be_disabled()
    start_long_edit(page, 40)
    page.reload(timeout=TIMEOUT_MS)

    # The image and its object are back; the edit is followed again, to its end.
    wait_status(page, r"Object 1 · 0 \+ / 0 − points · box .*restored after a reload")
    tab(page, "Edit").click()
    wait_text(page, "#edit-status", r"Editing: Edit 1 · full_body ← Object 1 cut-out")
    expect(page.locator("#edit-cancel")).to_be_enabled()
    wait_text(page, "#edit-status", r"Edit 1 · full_body ← Object 1 cut-out · done in")
    expect(page.locator("#edit-history .thumbnail-item")).to_have_count(1)
    expect(page.locator("#edit-cancel")).to_be_disabled()

    # Reloaded after it: the history, the result shown, the parse, all still there.
    page.reload(timeout=TIMEOUT_MS)
    wait_status(page, r"Object 1 · 0 \+ / 0 − points · box .*restored after a reload")
    tab(page, "Edit").click()
    wait_text(page, "#edit-status", r"Edit 1 · full_body ← Object 1 cut-out · restored")
    expect(page.locator("#edit-history .thumbnail-item")).to_have_count(1)
    tab(page, "Body & garments").click()
    assert wait_text(page, "#parse-status", "parsed") == parsed
    assert page.request.get(url).ok

    # A new image ends the old session, and its files with it.
    tab(page, "Segment").click()
    other = tmp_path / "other"
    other.mkdir()
    upload_character(page, other)
    assert page.request.get(url).status == 404
    reply = page.request.get(url)
    assert reply.status == 404 and b"/tmp" not in reply.body()

