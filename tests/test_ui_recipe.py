"""The Recipe tab in a real headless Chromium against the real app (tiny random weights): a
session's recipe downloaded, then uploaded with its image and replayed to the same mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page

from atelier3d.samples import drawn_character
from tests.test_ui_browser import (  # noqa: F401 - browser and page are fixtures
    SHIRT,
    TIMEOUT_MS,
    browser,
    click_image,
    download,
    page,
    tab,
    upload_character,
    wait_status,
)

pytestmark = pytest.mark.browser


def test_recipe_tab_exports_and_replays(page: Page, http, tmp_path: Path) -> None:  # noqa: F811
    upload_character(page, tmp_path)
    click_image(page, *SHIRT)
    wait_status(page, r"1 \+ / 0 − points .*score")
    tab(page, "Recipe").click()
    page.get_by_role("button", name="Export this session's recipe").click()
    name, data = download(page, "recipe-export")
    recipe = json.loads(data)
    assert name.endswith(".recipe.json") and recipe["schema_version"] == 1
    [obj] = recipe["objects"]
    assert len(obj["steps"][0]["points"]) == 1

    recipe_path, image_path = tmp_path / "recipe.json", tmp_path / "character.png"
    recipe_path.write_bytes(data)
    Image.fromarray(drawn_character()).save(image_path)
    page.locator("#recipe-upload input[type=file]").set_input_files(str(recipe_path))
    page.locator("#recipe-image input[type=file]").set_input_files(str(image_path))
    page.get_by_role("button", name="Replay", exact=True).click()
    summary = page.locator("#recipe-summary")
    summary.get_by_text("Replayed as session").wait_for(timeout=TIMEOUT_MS)
    assert "came out differently" not in summary.inner_text()
    # The replayed session is a real one, with the recorded mask.
    session_id = summary.locator("code").first.inner_text()
    try:
        replayed = http.get(f"/v1/sessions/{session_id}/recipe").json()
        assert replayed["objects"][0]["steps"] == obj["steps"]
    finally:
        http.delete(f"/v1/sessions/{session_id}")
