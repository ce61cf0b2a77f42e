"""What the Edit and 3D tabs offer as sources and say about them: the parse's parts worth a job
(not a few stray pixels of a label), listed by group (objects, parts, edits), the presets in
words with the text they add to the prompt, and a warning when an opaque image is sent to 3D
(in a real headless Chromium against the real app, tiny random weights)."""

# ruff: noqa: F811 - the browser test takes the browser and page fixtures imported below

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from atelier3d.serve.ui.edit import preset_words
from atelier3d.serve.ui.mesh import OPAQUE
from atelier3d.serve.ui.studio import pickable
from atelier3d.stages.edit import PRESETS
from atelier3d.stages.mesh import MIN_BOX_PX
from atelier3d.stages.parse import Part
from tests.test_ui_browser import (  # noqa: F401 - the browser and page fixtures
    MESH_STEPS,
    browser,
    image_sources,
    page,
    segment_with_box,
    set_number,
    tab,
    until_kept,
    wait_picked,
    wait_text,
)


def part(width: int, height: int, filled: bool = True) -> Part:
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = 255 if filled else 0
    return Part("upper-clothes", (4,), (10, 20, 10 + width, 20 + height), rgba)


def test_parts_too_small_or_empty_are_not_offered() -> None:
    assert pickable(part(MIN_BOX_PX, 3))
    assert not pickable(part(MIN_BOX_PX - 1, MIN_BOX_PX - 1))  # a few stray pixels
    assert not pickable(part(100, 100, filled=False))  # nothing visible in its box
    assert not pickable(part(MIN_BOX_PX, 1))  # a one-pixel line


@pytest.mark.browser
def test_presets_read_in_words_and_an_opaque_image_sent_to_3d_is_warned_of(
        page: Page, tmp_path: Path) -> None:
    segment_with_box(page, tmp_path)
    tab(page, "Edit").click()
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    # The preset picker names them in words and says what each adds to the prompt.
    preset = page.locator("#edit-preset input")
    assert preset.input_value() == "Full body"
    text = page.locator("#edit-preset-text")
    expect(text).to_contain_text("Adds to the prompt:")
    expect(text).to_contain_text(PRESETS["full_body"].prompt[:60])
    until_kept(lambda: (preset.click(), page.get_by_role("option", name="T-pose").click()),
               lambda: preset.input_value() == preset_words("t_pose"), "the preset")
    expect(text).to_contain_text(PRESETS["t_pose"].prompt[:60])
    until_kept(lambda: (preset.click(), page.get_by_role("option", name="Free").click()),
               lambda: preset.input_value() == "Free", "the preset")
    expect(text).to_contain_text("Adds nothing")

    # The original image (no transparency) sent to 3D: the tab says the asset will be of the
    # whole rectangle, and how to get the object alone.
    tab(page, "3D").click()
    wait_picked(page, "mesh-source", "Objects: Object 1 cut-out")
    source = page.locator("#mesh-source input")
    until_kept(lambda: (source.click(), page.get_by_role("option", name="Original image").click()),
               lambda: source.input_value() == "Original image", "the source")
    page.locator("#mesh-parameters").click()
    set_number(page, "mesh-steps", MESH_STEPS)
    set_number(page, "mesh-octree", 64)
    page.locator("#mesh-run").click()
    page.locator("[data-testid=toast-text]", has_text=OPAQUE[:60]).first.wait_for()
    # Whatever the job then does, it ends (nothing left running for the next test).
    wait_text(page, "#mesh-status", r"done in|failed|cancelled")
    expect(page.locator("#mesh-cancel")).to_be_disabled()


def options(page: Page, elem_id: str) -> list[str]:
    """The labels a dropdown lists, in order (opened, read, closed again)."""
    page.locator(f"#{elem_id} input").click()
    listed = page.get_by_role("option")
    listed.first.wait_for()
    texts = [text.replace("✓", "").strip() for text in listed.all_inner_texts()]
    page.keyboard.press("Escape")
    return texts


@pytest.mark.browser
def test_the_source_picker_lists_objects_parts_and_edits_by_group(
        page: Page, tmp_path: Path) -> None:
    segment_with_box(page, tmp_path)
    tab(page, "Body & garments").click()
    page.locator("#parse-run").click()
    wait_text(page, "#parse-status", r"Object 1 parsed: \d+ labels, \d+ parts")
    # The parts worth a job, from the gallery's cut-outs (each its part's crop).
    captions = page.locator("#parse-parts .caption-label").all_inner_texts()
    crops = [np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGBA"))
             for src in image_sources(page, "#parse-parts")]
    assert len(crops) == len(captions)
    parts = []
    for caption, crop in zip(captions, crops, strict=True):
        name = caption.split(" · ")[0]
        height, width = crop.shape[:2]
        if pickable(Part(name, (), (0, 0, width, height), crop)):
            parts.append(f"Parts: Object 1 · {name}")
            if caption.endswith("completed"):
                parts.append(f"Parts: Object 1 · {name} (completed)")
    assert parts, captions

    tab(page, "Edit").click()
    wait_picked(page, "edit-source", "Objects: Object 1 cut-out")
    page.locator("#edit-parameters").click()
    set_number(page, "edit-steps", 2)
    page.locator("#edit-run").click()
    wait_text(page, "#edit-status", r"Edit 1 · full_body ← Object 1 cut-out · done in")
    edits = ["Edits: Edit 1 · full_body ← Object 1 cut-out"]

    # The original first, then each group in order, then the tab's own choices. The values
    # behind the labels did not change: the status line above named the source it ran on.
    objects = ["Objects: Object 1 cut-out"]
    assert options(page, "edit-source") == ["Original image", *objects, *parts, *edits]
    tab(page, "3D").click()
    assert options(page, "mesh-source") == ["Original image", *objects, *parts, *edits,
                                            "Uploaded image (below)"]
