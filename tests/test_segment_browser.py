"""SAM's decoder in the browser: the routes it uses, and its masks in a real headless Chromium.

The browser runs the server's own ONNX graph with onnxruntime-web (WASM here: the test browser
has no GPU) on the float16 embedding the server hands out; its masks must equal the server's and
segment-anything's own SamPredictor (float32) except where a logit sits within 1e-4 of the
threshold, and the steps it records must be what the server's history then holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pytest
from playwright.sync_api import Browser, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from atelier3d import rle
from tests.helpers import png_bytes
from tests.test_fidelity import LOGIT_TIE, reference, synthetic_image
from tests.test_ui_browser import (
    TIMEOUT_MS,
    browser,  # noqa: F401  (the module's Chromium fixture)
    click_image,
    upload_character,
    wait_status,
)

# portrait, landscape, tiny, and a photo's 1024x683 (height, width)
SIZES = [(700, 333), (333, 701), (17, 29), (683, 1024)]


@pytest.fixture(scope="module")
def predictor(tiny_sam):
    from segment_anything import SamPredictor

    return SamPredictor(tiny_sam.build())


@pytest.fixture()
def page(browser: Browser, server: str) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server, timeout=TIMEOUT_MS)
    page.wait_for_function("() => window.atelierSegment?.ready === true", timeout=TIMEOUT_MS)
    yield page
    context.close()


def new_session(http, image: np.ndarray) -> str:
    r = http.post("/v1/sessions?wait=true", files={"image": ("x.png", png_bytes(image))})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def prompts_for(height: int, width: int) -> dict[str, dict]:
    return {
        "point": {"points": [[round(width * 0.4), round(height * 0.5)]], "labels": [1]},
        "negative point": {"points": [[round(width * 0.3), round(height * 0.3)],
                                      [round(width * 0.7), round(height * 0.6)]],
                           "labels": [1, 0]},
        "box": {"box": [round(width * 0.1), round(height * 0.2), round(width * 0.8),
                        round(height * 0.9)]},
    }


def assert_same(mask: np.ndarray, other: np.ndarray, ref_logits: np.ndarray, what: str) -> None:
    differ = mask != other
    assert np.all(np.abs(ref_logits[differ]) < LOGIT_TIE), (
        f"{what}: {differ.sum()} pixels differ, max |logit| there "
        f"{np.abs(ref_logits[differ]).max()}")


def browser_decode(page: Page, sid: str, size: tuple[int, int], prompt: dict,
                   refine_from: dict | None = None) -> tuple[list[np.ndarray], list[float]]:
    height, width = size
    out = page.evaluate(
        "([sid, h, w, prompt, refineFrom]) =>"
        " window.atelierSegment.decode(sid, h, w, prompt, {refineFrom})",
        [sid, height, width, prompt, refine_from],
    )
    masks = [rle.decode({"size": [height, width], "counts": counts}, size)
             for counts in out["counts"]]
    return masks, out["scores"]


def test_decoder_graph_is_the_servers_and_cacheable(http):
    described = http.get("/v1/segment/decoder")
    assert described.status_code == 200, described.text
    body = described.json()
    assert body["embedding_dtype"] == "float16"
    assert body["multimask"]["sha256"] != body["single"]["sha256"]
    for graph in (body["multimask"], body["single"]):
        r = http.get(graph["url"])
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == graph["sha256"]
        assert len(r.content) == graph["bytes"]
        assert "immutable" in r.headers["cache-control"]
    missing = http.get(f"/v1/segment/decoder/{'0' * 64}.onnx")
    assert missing.status_code == 404
    assert "hash" in missing.json()["error"]["message"]


def test_browser_runtime_is_served_locally(http):
    runtime = http.get("/ui-static/runtime.json").json()
    wasm = http.get(f"{runtime['ort']}ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.content[:4] == b"\0asm"
    assert http.get(f"{runtime['ort']}package.json").status_code == 404  # only the runtime
    assert http.get("/ui-static/ort/0.0.0/ort.wasm.min.mjs").status_code == 404
    script = http.get("/ui-static/segment_browser.js")
    assert script.status_code == 200 and "atelierSegment" in script.text


def test_embedding_is_float16_of_the_sessions(http, predictor):
    image = synthetic_image(333, 701, seed=3)
    sid = new_session(http, image)
    r = http.get(f"/v1/sessions/{sid}/embedding")
    assert r.status_code == 200, r.text
    assert r.headers["x-embedding-dtype"] == "float16"
    assert r.headers["x-embedding-shape"] == "1,256,64,64"
    assert len(r.content) == 2 * 256 * 64 * 64
    served = np.frombuffer(r.content, np.float16).reshape(1, 256, 64, 64)
    predictor.set_image(image)
    expected = predictor.get_image_embedding().numpy().astype(np.float16)
    np.testing.assert_allclose(served.astype(np.float32), expected.astype(np.float32),
                               rtol=1e-3, atol=1e-4)
    assert http.get("/v1/sessions/nope/embedding").status_code == 404
    http.delete(f"/v1/sessions/{sid}")


def test_recorded_steps_join_the_history(http):
    height, width = 40, 60
    sid = new_session(http, synthetic_image(height, width, seed=5))
    oid = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    mask = np.zeros((1, height, width), bool)
    mask[0, 10:20, 5:30] = True
    step = {"points": [[10.0, 15.0]], "labels": [1],
            "masks": [{"rle": rle.encode(mask)[0], "score": 0.5},
                      {"rle": {"size": [height, width], "counts": [height * width]},
                       "score": 0.25}],
            "selected": 0}
    r = http.post(f"/v1/sessions/{sid}/objects/{oid}/steps", json=step)
    assert r.status_code == 201, r.text
    state = r.json()
    assert state["step"] == 1 and state["selected"] == 0
    assert state["masks"][0]["area"] == 250 and state["masks"][0]["bbox"] == [5, 10, 25, 10]
    assert state["masks"][1]["area"] == 0
    # The cut-out and a server refine use it like any other step.
    cut = http.post(f"/v1/sessions/{sid}/cutout", json={"object_id": oid})
    assert cut.status_code == 200
    refined = http.post(f"/v1/sessions/{sid}/segment", json={
        "points": [[10.0, 15.0], [40.0, 30.0]], "labels": [1, 0], "object_id": oid,
        "refine": True})
    assert refined.status_code == 200, refined.text
    assert http.post(f"/v1/sessions/{sid}/objects/{oid}/undo").json()["step"] == 1

    bad_size = {**step, "masks": [{"rle": {"size": [3, 3], "counts": [9]}, "score": 0.1}]}
    outside = {**step, "points": [[600.0, 15.0]]}
    for body, status, words in [
        (bad_size, 400, "does not match the image"),
        (outside, 400, "outside"),
        ({**step, "selected": 2}, 422, "only 2 masks"),
        ({**step, "masks": []}, 422, "at least 1"),
    ]:
        r = http.post(f"/v1/sessions/{sid}/objects/{oid}/steps", json=body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"]
    assert http.post(f"/v1/sessions/{sid}/objects/nope/steps", json=step).status_code == 404
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.browser
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_browser_masks_equal_the_servers(page, http, predictor, size):
    height, width = size
    image = synthetic_image(height, width, seed=height + width)
    sid = new_session(http, image)
    predictor.set_image(image)
    assert page.evaluate("window.atelierSegment.mode") == "browser"
    nontrivial = 0
    for name, prompt in prompts_for(height, width).items():
        masks, scores = browser_decode(page, sid, size, prompt)
        served = http.post(f"/v1/sessions/{sid}/segment", json=prompt).json()["masks"]
        logits, ref_scores, _ = reference(predictor, prompt, True)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-3)
        for k, (mask, candidate, ref) in enumerate(zip(masks, served, logits, strict=True)):
            assert_same(mask, ref > 0, ref, f"{name} #{k} vs SamPredictor")
            assert_same(mask, rle.decode(candidate["rle"], size), ref, f"{name} #{k} vs server")
            nontrivial += 0 < mask.mean() < 1
    # Refine: the first point's candidate 2 (its low-res logits), then a negative point.
    first = prompts_for(height, width)["point"]
    second = prompts_for(height, width)["negative point"]
    masks, _ = browser_decode(page, sid, size, second, {"prompt": first, "chosen": 2})
    _, _, low_res = reference(predictor, first, True)
    logits, _, _ = reference(predictor, second, True, mask_input=low_res[2][None])
    for k, (mask, ref) in enumerate(zip(masks, logits, strict=True)):
        assert_same(mask, ref > 0, ref, f"refine #{k} vs SamPredictor")
    if min(size) > 100:
        assert nontrivial > 0, "every mask was empty or full: the comparison would prove nothing"
    http.delete(f"/v1/sessions/{sid}")


@pytest.mark.browser
def test_segment_tab_decodes_clicks_in_the_browser(page, http, tmp_path):
    """A click and a box in the tab: decoded here, drawn, recorded, no server decode."""
    line = page.locator("#decoder-mode")
    assert "decoded in this browser" in line.inner_text()
    upload_character(page, tmp_path)
    page.wait_for_function("() => window.atelierSegment.stats.embeddingBytes > 0")
    click_image(page, 192, 265)
    wait_status(page, r"Object 1 · 1 \+ / 0 − points .*decoded in the browser")
    recorded = page.evaluate("window.atelierSegment.lastRecorded")
    assert recorded["step"] == 1 and recorded["labels"] == [1]
    assert np.abs(np.subtract(recorded["points"], [[192, 265]])).max() <= 1
    sid = page.evaluate("JSON.parse(document.querySelector('#segment-state textarea').value)")
    state = http.get(f"/v1/sessions/{sid['session_id']}/objects/{sid['object_id']}").json()
    assert state == recorded
    assert page.evaluate("window.atelierSegment.stats.clicks") == 1
    # A second click refines it; undo (a server action) goes back to the first step.
    click_image(page, 192, 400)
    wait_status(page, r"Object 1 · 2 \+ / 0 − points .*decoded in the browser")
    page.locator("#undo").click()
    wait_status(page, r"Object 1 · 1 \+ / 0 − points")
    page.get_by_label("box corner").check()
    click_image(page, 90, 30)
    click_image(page, 300, 620)
    wait_status(page, r"Object 1 · 1 \+ / 0 − points · box .*decoded in the browser")
    assert page.evaluate("window.atelierSegment.stats.clicks") == 3


@pytest.mark.browser
def test_segment_tab_falls_back_to_the_server(browser, server, tmp_path):  # noqa: F811
    """Without the browser runtime (here: its files refused) clicks go to the server, and the
    tab says so."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    context.route("**/ui-static/ort/**", lambda route: route.abort())
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.atelierSegment?.ready === true", timeout=TIMEOUT_MS)
        assert page.evaluate("window.atelierSegment.mode") == "server"
        assert "Clicks run on the server" in page.locator("#decoder-mode").inner_text()
        upload_character(page, tmp_path)
        click_image(page, 192, 265)
        text = wait_status(page, r"Object 1 · 1 \+ / 0 − points .* ms$")
        assert "decoded in the browser" not in text
        assert page.evaluate("window.atelierSegment.stats.clicks") == 0
    finally:
        context.close()


@pytest.mark.browser
def test_first_click_after_reset_is_decoded_in_the_browser(page, http, tmp_path):
    """Reset empties the object (a server action); the next click is decoded here again, as a
    fresh prompt, and recorded after the reset."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    upload_character(page, tmp_path)
    page.wait_for_function("() => window.atelierSegment.stats.embeddingBytes > 0")
    click_image(page, 192, 265)
    wait_status(page, r"Object 1 · 1 \+ / 0 − points .*decoded in the browser")
    page.locator("#reset").click()
    wait_status(page, r"Object 1: click on the image")
    click_image(page, 192, 400)
    try:
        page.wait_for_function("() => window.atelierSegment.stats.clicks === 2", timeout=60_000)
    except PlaywrightTimeout:
        state = page.evaluate("({mode: window.atelierSegment.mode,"
                              " reason: window.atelierSegment.reason,"
                              " state: document.querySelector('#segment-state textarea').value})")
        raise AssertionError(
            f"the click after the reset was not decoded: {state} {errors}") from None
    wait_status(page, r"Object 1 · 1 \+ / 0 − points .*decoded in the browser")
    assert page.evaluate("window.atelierSegment.mode") == "browser"
    recorded = page.evaluate("window.atelierSegment.lastRecorded")
    assert recorded["step"] == 3 and recorded["labels"] == [1] and recorded["can_undo"]
    assert np.abs(np.subtract(recorded["points"], [[192, 400]])).max() <= 1


def image_point_on_screen(page: Page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) of the overlay is on the screen."""
    box = page.locator("#overlay img").evaluate(
        """(i, [x, y]) => {
            const r = i.getBoundingClientRect();
            const s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight, 1);
            return [r.left + (r.width - i.naturalWidth * s) / 2 + x * s,
                    r.top + (r.height - i.naturalHeight * s) / 2 + y * s];
        }""", [x, y])
    return box[0], box[1]


@pytest.mark.browser
def test_a_box_dragged_on_the_image_is_one_step(page, http, tmp_path):
    """Pressing, dragging and releasing on the image (in the add mode) makes one box prompt,
    decoded here and recorded, with no point and no corner click left over."""
    upload_character(page, tmp_path)
    page.wait_for_function("() => window.atelierSegment.stats.embeddingBytes > 0")
    page.locator("#overlay img").scroll_into_view_if_needed()
    start, end = image_point_on_screen(page, 90, 30), image_point_on_screen(page, 300, 620)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()
    wait_status(page, r"Object 1 · 0 \+ / 0 − points · box .*decoded in the browser")
    recorded = page.evaluate("window.atelierSegment.lastRecorded")
    assert recorded["step"] == 1 and recorded["points"] == []
    assert np.abs(np.subtract(recorded["box"], [90, 30, 300, 620])).max() <= 2
    assert page.evaluate("window.atelierSegment.stats.clicks") == 1
    sid = page.evaluate("JSON.parse(document.querySelector('#segment-state textarea').value)")
    state = http.get(f"/v1/sessions/{sid['session_id']}/objects/{sid['object_id']}").json()
    assert state["box"] == recorded["box"] and state["step"] == 1


@pytest.mark.browser
def test_keyboard_shortcuts_press_the_tabs_controls(page, tmp_path):
    """R and B choose the click mode, Ctrl+Z undoes, Ctrl+Y redoes, N adds an object; keys
    typed into a text field are left alone."""
    upload_character(page, tmp_path)
    page.wait_for_function("() => window.atelierSegment.stats.embeddingBytes > 0")
    click_image(page, 192, 265)
    wait_status(page, r"Object 1 · 1 \+ / 0 − points")
    page.locator("body").click(position={"x": 5, "y": 5})  # focus on the page, not a field
    page.keyboard.press("r")
    assert page.get_by_label("remove (−)").is_checked()
    page.keyboard.press("b")
    assert page.get_by_label("box corner").is_checked()
    page.keyboard.press("a")
    assert page.get_by_label("add (+)").is_checked()
    page.keyboard.press("Control+z")
    wait_status(page, r"Object 1: click on the image")
    page.keyboard.press("Control+y")
    wait_status(page, r"Object 1 · 1 \+ / 0 − points")
    page.keyboard.press("n")
    wait_status(page, r"Object 2")
    page.locator("#object-select input").focus()
    page.keyboard.press("r")
    assert page.get_by_label("add (+)").is_checked()
