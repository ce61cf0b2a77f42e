"""The character's edits over the /v1 API, on what a session holds: a parse part and an object's
cut-out. Real Ray Serve, real HTTP, the tiny Qwen-Image-Edit pipeline with its Lightning LoRA;
each served edit equals diffusers' pipeline called directly on the same inputs and seed."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from atelier3d import rle
from atelier3d.imaging import crop_with_margin
from atelier3d.samples import drawn_character
from atelier3d.serve.jobs.sources import OBJECT_MARGIN
from atelier3d.stages.edit import PRESETS
from tests.helpers import direct, on_white, one_thread, uploaded
from tests.test_client_cli import run_cli
from tests.test_edit_api import served_edit

IMAGE = drawn_character()
H, W = IMAGE.shape[:2]
FIGURE_BOX = [90, 30, 300, 620]  # x0, y0, x1, y1 around the drawn figure
STEPS = 2
SEED = 9


@pytest.fixture(scope="module")
def character(server):
    """A session with the figure segmented as an object and parsed: (session, object, its mask,
    the parse response)."""
    with httpx.Client(base_url=server, timeout=120) as http, \
            uploaded(http, IMAGE) as session_id:
        obj = http.post(f"/v1/sessions/{session_id}/objects").json()["object_id"]
        seg = http.post(f"/v1/sessions/{session_id}/segment",
                        json={"box": FIGURE_BOX, "multimask": False, "object_id": obj})
        assert seg.status_code == 200, seg.text
        mask = rle.decode(seg.json()["masks"][0]["rle"], (H, W))
        parse = http.post(f"/v1/sessions/{session_id}/parse", json={"object_id": obj})
        assert parse.status_code == 200, parse.text
        yield session_id, obj, mask, parse.json()


def png(http, url: str) -> np.ndarray:
    r = http.get(url)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def occluded_part(parse: dict) -> dict:
    parts = [p for p in parse["parts"] if p["completed_url"]]
    assert parts, "the tiny parser completed no part of the drawn character"
    return parts[0]


def expected_edit(tiny_dir, image: np.ndarray, preset: str, **inputs) -> np.ndarray:
    """The edit with diffusers alone: the 8-step Lightning file, the preset's prompts."""
    from atelier3d.models.edit.lightning import EDIT_FILES
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir

    with one_thread():
        return direct(tiny_edit_dir(tiny_dir), tiny_lightning_dir(tiny_dir), EDIT_FILES[1],
                      [image], steps=STEPS, prompt=PRESETS[preset].prompt, seed=SEED,
                      negative_prompt=PRESETS[preset].negative_prompt, **inputs)


def test_the_hidden_region_is_shown_before_the_completion(http, character):
    """The parse says, per part, which region completion fills: what the completed cut-out adds
    to the visible one; parts that nothing hid have none."""
    _, _, _, parse = character
    part = occluded_part(parse)
    visible, completed = png(http, part["url"]), png(http, part["completed_url"])
    hidden = rle.decode(part["hidden"], visible.shape[:2])
    np.testing.assert_array_equal(hidden, (completed[..., 3] > 0) & (visible[..., 3] == 0))
    assert hidden.any()
    assert all(p["hidden"] is None for p in parse["parts"] if not p["completed_url"])


@pytest.mark.parametrize("region", ["found", "edited"])
def test_complete_occluded_on_a_part_equals_the_inpaint_pipeline(http, character, tiny_dir,
                                                                 region):
    """Without a mask the hidden region is repainted; a changed region sent as an RLE is
    repainted instead. Either equals QwenImageEditInpaintPipeline on the cut-out (on white)."""
    session, _, _, parse = character
    part = occluded_part(parse)
    visible = png(http, part["url"])
    hidden = rle.decode(part["hidden"], visible.shape[:2])
    body = {"session_id": session, "preset": "complete_occluded", "steps": STEPS, "seed": SEED,
            "source": {"kind": "part", "parse_id": parse["parse_id"], "part": part["name"]}}
    if region == "edited":  # the user erased the lower half of the proposed region
        hidden[hidden.shape[0] // 2:] = False
        assert hidden.any()
        body["mask"] = rle.encode(hidden[None])[0]
    served = served_edit(http, body)
    np.testing.assert_array_equal(
        served, expected_edit(tiny_dir, on_white(visible), "complete_occluded", mask=hidden,
                              size=None))


@pytest.mark.parametrize("preset", ["t_pose", "full_body"])
@pytest.mark.parametrize("source", ["part", "object"])
def test_pose_presets_on_a_part_and_a_cutout_equal_the_pipeline(http, character, tiny_dir,
                                                                 preset, source):
    session, obj, mask, parse = character
    if source == "part":
        part = occluded_part(parse)
        given = {"kind": "part", "parse_id": parse["parse_id"], "part": part["name"]}
        rgba = png(http, part["url"])
    else:
        given = {"kind": "object", "object_id": obj}
        x0, y0, x1, y1 = crop_with_margin(mask, OBJECT_MARGIN)
        rgba = np.dstack([IMAGE[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.uint8) * 255])
    served = served_edit(http, {"session_id": session, "preset": preset, "steps": STEPS,
                                "seed": SEED, "source": given, "width": 256, "height": 256})
    np.testing.assert_array_equal(served,
                                  expected_edit(tiny_dir, on_white(rgba), preset, size=256))


def test_completion_needs_a_region(http, character):
    """A source with nothing hidden and no mask is refused before anything queues."""
    session, obj, _, parse = character
    # The largest part that nothing hid (a thin one, a belt, is refused for its size first).
    plain = sorted((p for p in parse["parts"] if p["hidden"] is None),
                   key=lambda p: min(p["bbox"][2:]))
    sources = [{"kind": "object", "object_id": obj}]
    if plain:
        sources.append({"kind": "part", "parse_id": parse["parse_id"], "part": plain[-1]["name"]})
    for source in sources:
        r = http.post("/v1/jobs/edit", json={"session_id": session, "preset": "complete_occluded",
                                              "source": source})
        assert r.status_code == 400, (source, r.text)
        assert "needs a mask" in r.json()["error"]["message"]


def test_cli_completes_a_part_showing_its_region_first(server, tmp_path, tiny_dir):
    """``atelier3d edit --box ... --part NAME --preset complete_occluded`` prints and writes the
    hidden region before the job runs; ``--mask`` repaints an edited region instead, and the
    result is the inpaint pipeline's on that region."""
    photo = tmp_path / "character.png"
    Image.fromarray(IMAGE).save(photo)
    box = ["--box", ",".join(map(str, FIGURE_BOX)), "--server", server]
    proc = run_cli(str(photo), *box, "-o", str(tmp_path / "parsed"), command="parse")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = json.loads((tmp_path / "parsed" / "result.json").read_text())["parts"]
    part = next(p for p in parts if p["hidden"] is not None)
    visible = np.asarray(Image.open(tmp_path / "parsed" / "parts" / f"{part['name']}.png"))
    hidden = rle.decode(part["hidden"], visible.shape[:2])

    edit = [*box, "--part", part["name"], "--preset", "complete_occluded", "--steps", str(STEPS),
            "--seed", str(SEED), "--quiet"]
    proc = run_cli(str(photo), *edit, "--region-out", str(tmp_path / "region.png"),
                   "-o", str(tmp_path / "found.png"), command="edit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    shown = lines.index(f"hidden region of {part['name']}: {int(hidden.sum())} px of "
                        f"{visible.shape[1]}x{visible.shape[0]}")
    assert shown < next(i for i, line in enumerate(lines) if line.startswith("job "))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "region.png")) > 0, hidden)

    hidden[hidden.shape[0] // 2:] = False  # the user erases the lower half, then sends it
    Image.fromarray(hidden.astype(np.uint8) * 255).save(tmp_path / "edited.png")
    proc = run_cli(str(photo), *edit, "--mask", str(tmp_path / "edited.png"),
                   "-o", str(tmp_path / "completed.png"), command="edit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hidden region" not in proc.stdout
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "completed.png")),
        expected_edit(tiny_dir, on_white(visible), "complete_occluded", mask=hidden, size=None))

    proc = run_cli(str(photo), "--server", server, "--part", part["name"],
                   "-o", str(tmp_path / "x.png"), command="edit")
    assert proc.returncode == 2 and "--part needs the character" in proc.stderr


def garment_photo() -> np.ndarray:
    """A reference image of its own: a striped coat on grey."""
    photo = np.full((160, 128, 3), 120, np.uint8)
    photo[20:150, 24:104] = (30, 60, 160)
    photo[20:150:12, 24:104] = (230, 200, 40)
    return photo


def test_cli_edits_with_a_reference_image(server, tmp_path, tiny_dir):
    """``atelier3d edit IMAGE --reference GARMENT`` uploads the garment as a session of its own
    and names it as an extra source: the Plus pipeline on both images, as diffusers runs it."""
    from atelier3d.models.edit.lightning import EDIT_2509_FILES
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir

    photo, garment = tmp_path / "character.png", tmp_path / "coat.png"
    Image.fromarray(IMAGE).save(photo)
    Image.fromarray(garment_photo()).save(garment)
    prompt = "dress the character in the coat of image 2"
    proc = run_cli(str(photo), "--server", server, "--reference", str(garment), "--prompt", prompt,
                   "--steps", str(STEPS), "--seed", str(SEED), "--width", "256", "--height", "256",
                   "--quiet", "-o", str(tmp_path / "dressed.png"), command="edit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with one_thread():
        expected = direct(tiny_edit_dir(tiny_dir, plus=True), tiny_lightning_dir(tiny_dir),
                          EDIT_2509_FILES[1], [IMAGE, garment_photo()], steps=STEPS,
                          prompt=prompt, size=256, seed=SEED)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "dressed.png")), expected)

    proc = run_cli(str(photo), "--server", server, "--reference", str(tmp_path / "none.png"),
                   "--prompt", prompt, "-o", str(tmp_path / "x.png"), command="edit")
    assert proc.returncode == 2 and "no such reference image" in proc.stderr


def test_a_reference_session_must_exist(http, character):
    session = character[0]
    r = http.post("/v1/jobs/edit", json={
        "session_id": session, "prompt": "wear the coat",
        "extra_sources": [{"kind": "session", "session_id": "ses_nothere"}]})
    assert r.status_code == 404 and "session" in r.json()["error"]["message"]
    r = http.post("/v1/jobs/edit", json={"session_id": session, "prompt": "wear the coat",
                                          "extra_sources": [{"kind": "session"}]})
    assert r.status_code == 422 and "session_id" in r.text
