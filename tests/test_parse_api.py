"""Body and garment separation over the /v1 API (real HTTP, the real app with tiny weights).

What the server answers is compared with the HumanParser class called in-process on the same
image and mask: same label map, same per-label RLEs, same cut-outs, keypoints and checks.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from atelier3d import rle
from atelier3d.samples import drawn_character, drawn_character_labels
from atelier3d.stages.parse import LABELS, PALETTE, render_pose_map
from tests.helpers import assert_error, png_bytes, uploaded

IMAGE = drawn_character()
TRUTH = drawn_character_labels()
H, W = IMAGE.shape[:2]
FIGURE_BOX = [90, 30, 300, 620]  # x0, y0, x1, y1 around the drawn figure
RESPONSE_KEYS = {"parse_id", "object_id", "labels", "masks", "keypoints", "parts", "checks",
                 "parse_map_url", "pose_map_url", "zip_url", "timings_ms"}


@pytest.fixture()
def sid(http):
    with uploaded(http, IMAGE) as session_id:
        yield session_id


def png(http, url: str, mode: str) -> np.ndarray:
    r = http.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(r.content))
    assert image.mode == mode
    return np.asarray(image)


def label_ids(parse_map: np.ndarray) -> np.ndarray:
    """The ATR ids of a parse map in the palette (its 18 colours are distinct)."""
    codes = PALETTE.astype(np.int64) @ [65536, 256, 1]
    found = parse_map.astype(np.int64) @ [65536, 256, 1]
    ids = np.searchsorted(np.sort(codes), found)
    assert (np.sort(codes)[ids] == found).all(), "colours outside the ATR palette"
    return np.argsort(codes)[ids].astype(np.uint8)


def check_against_direct(http, body: dict, direct) -> None:
    """Everything the server answered and serves equals ``direct`` (a ParseResult)."""
    assert set(body) == RESPONSE_KEYS
    assert body["labels"] == direct.labels
    assert body["masks"] == direct.rles
    # The colour-coded parse map is the label map, pixel for pixel.
    parse_map = png(http, body["parse_map_url"], "RGB")
    assert parse_map.shape == (H, W, 3)
    np.testing.assert_array_equal(label_ids(parse_map), direct.label_map)
    for name, encoded in body["masks"].items():
        np.testing.assert_array_equal(rle.decode(encoded, (H, W)),
                                      direct.label_map == LABELS.index(name))
    # Pose: the same keypoints and the OpenPose drawing of them.
    assert [k["name"] for k in body["keypoints"]] == [k.name for k in direct.keypoints]
    for got, want in zip(body["keypoints"], direct.keypoints, strict=True):
        assert abs(got["x"] - want.x) < 1e-3 and abs(got["y"] - want.y) < 1e-3
        assert abs(got["confidence"] - want.confidence) < 1e-4
    np.testing.assert_array_equal(png(http, body["pose_map_url"], "RGB"),
                                  render_pose_map(direct.pose, (H, W)))
    assert [c["name"] for c in body["checks"]] == [c.name for c in direct.checks]
    assert [c["passed"] for c in body["checks"]] == [c.passed for c in direct.checks]
    assert all(set(c) == {"name", "passed", "reason", "suggestion"} for c in body["checks"])
    # Parts: one cut-out per garment and group, cropped to its bbox, as the parser cut them.
    assert [p["name"] for p in body["parts"]] == [p.name for p in direct.parts]
    for part, want in zip(body["parts"], direct.parts, strict=True):
        x0, y0, x1, y1 = want.box
        assert part["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert part["labels"] == [LABELS[i] for i in want.labels]
        np.testing.assert_array_equal(png(http, part["url"], "RGBA"), want.rgba)
        if want.name in direct.completed:
            completed = png(http, part["completed_url"], "RGBA")
            assert completed.shape == want.rgba.shape
            np.testing.assert_array_equal(completed, direct.completed[want.name])
        else:
            assert part["completed_url"] is None
    # The ZIP holds every cut-out (and completed version) and a manifest to place them.
    r = http.get(body["zip_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert archive.testzip() is None
        expected = {f"{p.name}.png" for p in direct.parts}
        expected |= {f"{name}.completed.png" for name in direct.completed}
        assert set(archive.namelist()) == expected | {"parts.json"}
        for part in direct.parts:
            with archive.open(f"{part.name}.png") as f:
                np.testing.assert_array_equal(np.asarray(Image.open(f)), part.rgba)
        manifest = json.loads(archive.read("parts.json"))
    assert manifest["size_hw"] == [H, W]
    assert [p["box_xyxy"] for p in manifest["parts"]] == [list(p.box) for p in direct.parts]
    assert set(body["timings_ms"]) == {"parse_ms", "pose_ms", "parts_ms", "total_ms"}
    assert body["timings_ms"]["total_ms"] >= body["timings_ms"]["parse_ms"]


def test_ready_reports_the_parser(http):
    ready = http.get("/readyz").json()
    parser = ready["models"]["human_parser"]
    assert parser["model_type"] == "segformer-random+blazepose-full"
    assert parser["weights"] == "untrained" and ready["weights"] == "untrained"
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1/sessions/{session_id}/parse" in paths
    assert "/v1/sessions/{session_id}/parses/{parse_id}/parts/{name}.png" in paths


def test_parse_an_object_segmented_with_sam(http, sid, human_parser):
    obj = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    seg = http.post(f"/v1/sessions/{sid}/segment",
                    json={"box": FIGURE_BOX, "multimask": False, "object_id": obj})
    assert seg.status_code == 200, seg.text
    mask = rle.decode(seg.json()["masks"][0]["rle"], (H, W))
    assert mask.any()

    r = http.post(f"/v1/sessions/{sid}/parse", json={"object_id": obj})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object_id"] == obj and body["parse_id"].startswith("prs_")
    assert body["parts"], "the tiny parser found no part at all"
    check_against_direct(http, body, human_parser.parse(IMAGE, mask))
    # Nothing outside the character's mask is labelled.
    for encoded in body["masks"].values():
        assert not (rle.decode(encoded, (H, W)) & ~mask).any()
    # The stored result answers again, unchanged.
    again = http.get(f"/v1/sessions/{sid}/parses/{body['parse_id']}")
    assert again.status_code == 200 and again.json() == body


def test_parse_an_explicit_rle_with_options(http, sid, human_parser):
    mask = TRUTH > 0
    encoded = rle.encode(mask[None])[0]
    r = http.post(f"/v1/sessions/{sid}/parse",
                  json={"rle": encoded, "groups": ["hair"], "complete_occlusions": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object_id"] is None
    direct = human_parser.parse(IMAGE, mask, groups=["hair"], complete_occlusions=False)
    assert "clothing" not in [p.name for p in direct.parts]
    check_against_direct(http, body, direct)
    assert all(p["completed_url"] is None for p in body["parts"])
    # Uncompressed RLE counts (runs of 0s and 1s, column-major, from a 0 run) work the same.
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    counts = np.diff([0, *edges, flat.size]).tolist()
    r = http.post(f"/v1/sessions/{sid}/parse",
                  json={"rle": {"size": [H, W], "counts": [0, *counts] if flat[0] else counts},
                        "groups": ["hair"], "complete_occlusions": False})
    assert r.status_code == 200, r.text
    assert r.json()["masks"] == body["masks"]


def test_parses_are_bounded_and_expire_with_the_session(http):
    r = http.post("/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(IMAGE))})
    sid = r.json()["session_id"]
    encoded = rle.encode((TRUTH > 0)[None])[0]
    ids = [http.post(f"/v1/sessions/{sid}/parse", json={"rle": encoded}).json()["parse_id"]
           for _ in range(5)]  # the fixture's app keeps 4 per session (the default)
    assert len(set(ids)) == 5
    assert_error(http.get(f"/v1/sessions/{sid}/parses/{ids[0]}"), 404, "not_found")
    for parse_id in ids[1:]:
        assert http.get(f"/v1/sessions/{sid}/parses/{parse_id}").status_code == 200
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(http.get(f"/v1/sessions/{sid}/parses/{ids[-1]}/parse_map.png"), 404)


def test_parse_bad_input(http, sid):
    url = f"/v1/sessions/{sid}/parse"
    empty = rle.encode(np.zeros((1, H, W), bool))[0]
    assert "empty" in assert_error(http.post(url, json={"rle": empty}), 400, "bad_request")[
        "message"]
    wrong = rle.encode(np.ones((1, H // 2, W), bool))[0]
    assert "does not match" in assert_error(http.post(url, json={"rle": wrong}), 400)["message"]
    assert_error(http.post(url, json={"rle": {"size": [H, W], "counts": "!!"}}), 400)
    assert_error(http.post("/v1/sessions/ses_nope/parse", json={"rle": empty}), 404)
    obj = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    assert_error(http.post(url, json={"object_id": obj}), 409, "conflict")
    assert_error(http.post(url, json={"object_id": "obj_nope"}), 404)
    # Exactly one source of the mask; only known groups.
    full = rle.encode((TRUTH > 0)[None])[0]
    assert_error(http.post(url, json={}), 422, "invalid_request")
    assert_error(http.post(url, json={"rle": full, "object_id": obj}), 422)
    assert_error(http.post(url, json={"rle": full, "groups": ["shoes"]}), 422)

    body = http.post(url, json={"rle": full, "complete_occlusions": False}).json()
    base = f"/v1/sessions/{sid}/parses/{body['parse_id']}"
    assert_error(http.get(f"/v1/sessions/{sid}/parses/prs_nope"), 404)
    assert_error(http.get(f"/v1/sessions/{sid}/parses/prs_nope/parts.zip"), 404)
    missing = next(name for name in LABELS[1:] if name not in [p["name"] for p in body["parts"]])
    assert "no part" in assert_error(http.get(f"{base}/parts/{missing}.png"), 404)["message"]
    assert_error(http.get(f"{base}/parts/nonsense.png"), 404)
    part = body["parts"][0]["name"]
    assert "no completed" in assert_error(
        http.get(f"{base}/parts/{part}/completed.png"), 404)["message"]
    assert_error(http.get(f"{base}/parts/{part}.jpg"), 404)
