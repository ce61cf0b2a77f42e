"""Screenshots of each tab of the web UI, for the README: ``docs/screenshots/<tab>.png``.

Against a running server (``atelier3d serve``; its URL as the argument), with Debian's headless
Chromium driven by Playwright: uploads the drawn sample character, segments it with one click,
parses it, makes its 3D asset, and shows each tab as a person finds it then. With tiny random
weights the masks and parts are what untrained models give: the pictures show the flow, not the
models' quality.

Run: ``.venv/bin/python docs/screenshots.py http://127.0.0.1:8000``
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from atelier3d.samples import drawn_character

OUT = Path(__file__).parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 300_000
WIDTH = 1100  # the saved pictures' width: readable in a README, small in the repository


def wait_status(page: Page, pattern: str) -> None:
    page.wait_for_function(
        "p => new RegExp(p).test(document.querySelector('#status')?.innerText ?? '')",
        arg=pattern, timeout=TIMEOUT_MS)


def click_image(page: Page, x: float, y: float) -> None:
    """Clicks the overlay at image pixel (x, y), undoing the display's scaling and centring.
    A deliberate copy of the UI tests' ``click_image``: a docs script does not import tests."""
    img = page.locator("#overlay img")
    img.scroll_into_view_if_needed()
    offset = img.evaluate(
        """(i, [x, y]) => {
            const r = i.getBoundingClientRect();
            const s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight, 1);
            return {x: (r.width - i.naturalWidth * s) / 2 + x * s,
                    y: (r.height - i.naturalHeight * s) / 2 + y * s};
        }""", [x, y])
    img.click(position=offset)


def save(page: Page, name: str) -> Path:
    page.wait_for_timeout(800)  # let the tab's transition and images settle
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    shot = shot.resize((WIDTH, round(shot.height * WIDTH / shot.width)), Image.LANCZOS)
    path = OUT / f"{name}.png"
    shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")
    return path


def tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(args.url, timeout=TIMEOUT_MS)
        page.wait_for_selector("#upload input[type=file]", state="attached")
        save(page, "start")
        image = Path(tmp) / "character.png"
        Image.fromarray(drawn_character()).save(image)
        page.locator("#upload input[type=file]").set_input_files(str(image))
        wait_status(page, r"ready")
        click_image(page, 190, 300)
        wait_status(page, r"score")
        save(page, "segment")
        tab(page, "Body & garments")
        page.locator("#parse-run").click()
        page.wait_for_function(
            "() => (document.querySelector('#parse-legend')?.innerText ?? '').trim().length > 0",
            timeout=TIMEOUT_MS)
        save(page, "parse")
        tab(page, "Edit")
        save(page, "edit")
        tab(page, "3D")
        page.locator("#mesh-parameters").click()
        page.locator("#mesh-octree input").fill("128")  # a shape in seconds on a CPU
        page.locator("#mesh-parameters").click()
        page.locator("#mesh-run").click()
        page.wait_for_function(
            "() => /done in/.test(document.querySelector('#mesh-status')?.innerText ?? '')",
            timeout=TIMEOUT_MS)
        canvas = page.locator("#mesh-viewer canvas")
        canvas.scroll_into_view_if_needed()
        for _ in range(120):  # the viewer loads and frames the model over a few frames
            drawn = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
            if drawn.reshape(-1, 3).std(axis=0).max() > 5:
                break
            page.wait_for_timeout(500)
        page.evaluate("window.scrollTo(0, 0)")
        save(page, "mesh")
        for name, label in (("character", "Character → 3D"), ("recipe", "Recipe")):
            tab(page, label)
            save(page, name)
        browser.close()


if __name__ == "__main__":
    main()
