"""The /v1 API over real HTTP: sessions, objects, history, cut-outs, and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from atelier3d import rle
from atelier3d.samples import drawn_character
from tests.helpers import assert_error, png_bytes, uploaded

IMAGE = drawn_character(192, 320)
H, W = IMAGE.shape[:2]


@pytest.fixture()
def sid(http):
    with uploaded(http, IMAGE) as session_id:
        yield session_id


def test_health_ready_and_openapi(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["ready"] is True
    assert ready["weights"] == "untrained"  # tiny random weights, reported loudly
    assert ready["models"]["sam_encoder"]["model_type"] == "vit_tiny"
    spec = http.get("/openapi.json").json()
    assert "/v1/sessions/{session_id}/segment" in spec["paths"]
    assert http.get("/docs").status_code == 200


def test_session_lifecycle_and_raw_upload(http):
    r = http.post("/v1/sessions", content=png_bytes(IMAGE), headers={"content-type": "image/png"})
    assert r.status_code == 201
    info = r.json()
    assert (info["width"], info["height"]) == (W, H)
    assert info["embedding"] in ("pending", "ready")
    assert info["session_id"].startswith("ses_") and len(info["session_id"]) > 20
    sid = info["session_id"]
    seg = http.post(f"/v1/sessions/{sid}/segment", json={"points": [[96, 120]], "labels": [1]})
    assert seg.status_code == 200  # waits for the encode when needed
    assert http.get(f"/v1/sessions/{sid}").json()["embedding"] == "ready"
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(http.get(f"/v1/sessions/{sid}"), 404, "not_found")
    assert_error(http.post(f"/v1/sessions/{sid}/segment", json={"points": [[1, 1]],
                                                                 "labels": [1]}), 404)
    assert_error(http.delete(f"/v1/sessions/{sid}"), 404)


def test_candidates_have_rle_scores_boxes(http, sid):
    body = http.post(f"/v1/sessions/{sid}/segment",
                     json={"points": [[96, 250]], "labels": [1], "multimask": True}).json()
    assert len(body["masks"]) == 3
    for m in body["masks"]:
        mask = rle.decode(m["rle"], (H, W))
        assert m["area"] == mask.sum()
        assert isinstance(m["score"], float)
    single = http.post(f"/v1/sessions/{sid}/segment",
                       json={"box": [40, 180, 150, 300], "multimask": False}).json()
    assert len(single["masks"]) == 1 and single["selected"] == 0
    assert set(single["timings_ms"]) == {"wait_embedding_ms", "decode_ms", "total_ms"}


def test_objects_history_undo_redo_reset(http, sid):
    a = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    b = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    assert a != b

    def click(oid, points, labels, refine=False):
        r = http.post(f"/v1/sessions/{sid}/segment", json={
            "points": points, "labels": labels, "object_id": oid, "refine": refine})
        assert r.status_code == 200, r.text
        return r.json()

    s1 = click(a, [[96, 250]], [1])
    s2 = click(a, [[96, 250], [96, 100]], [1, 0], refine=True)
    click(b, [[60, 300]], [1])
    assert (s1["step"], s2["step"]) == (1, 2)

    state = http.post(f"/v1/sessions/{sid}/objects/{a}/undo").json()
    assert state["step"] == 1 and state["points"] == [[96, 250]] and state["can_redo"]
    assert state["masks"] == s1["masks"]
    state = http.post(f"/v1/sessions/{sid}/objects/{a}/redo").json()
    assert state["step"] == 2 and state["labels"] == [1, 0] and not state["can_redo"]
    assert state["masks"] == s2["masks"]
    # New step after an undo drops the redo branch.
    http.post(f"/v1/sessions/{sid}/objects/{a}/undo")
    s3 = click(a, [[96, 250], [30, 30]], [1, 0])
    assert s3["step"] == 2
    assert not http.get(f"/v1/sessions/{sid}/objects/{a}").json()["can_redo"]
    # Object b is untouched by a's history.
    state_b = http.get(f"/v1/sessions/{sid}/objects/{b}").json()
    assert state_b["step"] == 1 and state_b["points"] == [[60, 300]]
    # Select another candidate; reset is a step of its own, so undo brings the state back.
    chosen = http.post(f"/v1/sessions/{sid}/objects/{a}/select", json={"index": 0}).json()
    assert chosen["selected"] == 0
    reset = http.post(f"/v1/sessions/{sid}/objects/{a}/reset").json()
    assert reset["step"] == 3 and reset["masks"] == [] and reset["points"] == []
    assert reset["can_undo"] and not reset["can_redo"]
    assert_error(http.post(f"/v1/sessions/{sid}/cutout", json={"object_id": a}), 409, "conflict")
    assert_error(http.post(f"/v1/sessions/{sid}/segment", json={
        "points": [[96, 250]], "labels": [1], "object_id": a, "refine": True}), 409, "conflict")
    restored = http.post(f"/v1/sessions/{sid}/objects/{a}/undo").json()
    assert restored["step"] == 2 and restored["selected"] == 0 and restored["masks"] == s3["masks"]
    info = http.get(f"/v1/sessions/{sid}").json()
    assert sorted(info["objects"]) == sorted([a, b])
    assert http.delete(f"/v1/sessions/{sid}/objects/{b}").status_code == 204
    assert_error(http.get(f"/v1/sessions/{sid}/objects/{b}"), 404)
    assert_error(http.post(f"/v1/sessions/{sid}/segment", json={
        "points": [[1, 1]], "labels": [1], "object_id": b}), 404)


def test_cutout_png_alpha_matches_mask(http, sid):
    m = http.post(f"/v1/sessions/{sid}/segment",
                  json={"points": [[96, 250]], "labels": [1]}).json()["masks"][0]
    mask = rle.decode(m["rle"], (H, W))
    r = http.post(f"/v1/sessions/{sid}/cutout", json={"rle": m["rle"], "crop": False})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert out.shape == (H, W, 4)
    np.testing.assert_array_equal(out[..., 3] == 255, mask)
    np.testing.assert_array_equal(out[..., :3][mask], IMAGE[mask])
    x, y, w, h = m["bbox"]
    cropped = Image.open(io.BytesIO(http.post(f"/v1/sessions/{sid}/cutout",
                                              json={"rle": m["rle"]}).content))
    assert cropped.size == (w, h) and cropped.mode == "RGBA"
    white = Image.open(io.BytesIO(http.post(f"/v1/sessions/{sid}/cutout", json={
        "rle": m["rle"], "background": "white", "crop": False}).content))
    assert white.mode == "RGB"
    assert (np.asarray(white)[~mask] == 255).all()


def test_mask_input_rle_is_accepted(http, sid):
    m = http.post(f"/v1/sessions/{sid}/segment",
                  json={"points": [[96, 250]], "labels": [1]}).json()["masks"][1]
    r = http.post(f"/v1/sessions/{sid}/segment",
                  json={"points": [[96, 250]], "labels": [1], "mask_input": m["rle"]})
    assert r.status_code == 200 and len(r.json()["masks"]) == 3


# ---- bad input: each a 4xx JSON error, never a 500 ----------------------------------------


def upload(http, data: bytes, name: str = "x.png"):
    return http.post("/v1/sessions", files={"image": (name, data)})


def test_not_an_image(http):
    assert_error(upload(http, b"this is not an image"), 415, "unsupported_media_type")
    assert_error(upload(http, b""), 400)
    # The type is sniffed from the bytes, not the name.
    assert_error(upload(http, b"%PDF-1.4 fake", name="x.png"), 415)
    assert upload(http, png_bytes(IMAGE), name="photo.txt").status_code == 201


def test_truncated_png(http):
    data = png_bytes(IMAGE)
    assert_error(upload(http, data[: len(data) // 2]), 400, "bad_request")


def test_zero_size_image(http):
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        return struct.pack(">I", len(payload)) + kind + payload + crc

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0))
           + chunk(b"IEND", b""))
    assert upload(http, png).status_code in (400, 415)
    assert "error" in upload(http, png).json()


def test_decompression_bomb(http):
    # 3000x3000 of zeros compresses to a few KB but is 9 MP, over the 4 MP test limit.
    bomb = png_bytes(np.zeros((3000, 3000), np.uint8))
    assert len(bomb) < 100_000
    assert_error(upload(http, bomb), 413, "payload_too_large")


def test_oversize_bodies(http, sid):
    big = b"\0" * 2_200_000
    assert_error(upload(http, big), 413, "payload_too_large")
    huge_json = json.dumps({"points": [[1, 1]] * 400_000, "labels": [1] * 400_000})
    r = http.post(f"/v1/sessions/{sid}/segment", content=huge_json,
                  headers={"content-type": "application/json"})
    assert_error(r, 413)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"points": [[5000, 10]], "labels": [1]}, 400),  # outside the image
        ({"points": [[-1, 10]], "labels": [1]}, 400),
        ({"box": [0, 0, 10, 5000]}, 400),
        ({"points": [[10, 10], [20, 20]], "labels": [1]}, 422),  # length mismatch
        ({"points": [], "labels": []}, 422),  # empty prompt
        ({}, 422),
        ({"points": [[10, 10]], "labels": [2]}, 422),  # bad label
        ({"box": [50, 50, 10, 10]}, 422),  # inverted box
        ({"points": [[10, 10]] * 17, "labels": [1] * 17}, 413),  # over max_points (16)
        ({"points": [[10, 10]], "labels": [1], "refine": True}, 422),  # refine needs object
        ({"points": [[10, 10]], "labels": [1], "object_id": "obj_nope"}, 404),
        ({"points": [[10, 10]], "labels": [1], "mask_input": {"size": [3, 3], "counts": "0"}},
         400),  # RLE of the wrong size
        ({"points": [[10, 10]], "labels": [1], "mask_input": {"size": [H, W], "counts": "zz"}},
         400),  # malformed counts
        ({"points": [[10, 10]], "labels": [1], "extra": 1}, 422),
    ],
)
def test_bad_segment_requests(http, sid, body, status):
    assert_error(http.post(f"/v1/sessions/{sid}/segment", json=body), status)


def test_non_finite_and_malformed_json(http, sid):
    r = http.post(f"/v1/sessions/{sid}/segment", content='{"points": [[NaN, 1]], "labels": [1]}',
                  headers={"content-type": "application/json"})
    assert_error(r, 422)
    r = http.post(f"/v1/sessions/{sid}/segment", content="{not json",
                  headers={"content-type": "application/json"})
    assert_error(r, 422)


def test_bad_cutout_and_select(http, sid):
    assert_error(http.post(f"/v1/sessions/{sid}/cutout", json={}), 422)
    assert_error(http.post(f"/v1/sessions/{sid}/cutout",
                           json={"rle": {"size": [H, W], "counts": [H * W]}}), 400)  # empty mask
    assert_error(http.post(f"/v1/sessions/{sid}/cutout",
                           json={"rle": {"size": [H, W], "counts": [5, 5]}}), 400)
    oid = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
    assert_error(http.post(f"/v1/sessions/{sid}/objects/{oid}/select", json={"index": 0}), 409)
    http.post(f"/v1/sessions/{sid}/segment",
              json={"points": [[96, 250]], "labels": [1], "object_id": oid})
    assert_error(http.post(f"/v1/sessions/{sid}/objects/{oid}/select", json={"index": 3}), 400)
    assert_error(http.post(f"/v1/sessions/{sid}/objects/{oid}/select", json={"index": -1}), 422)


def test_unknown_routes_are_json_errors(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.put("/v1/sessions"), 405)
