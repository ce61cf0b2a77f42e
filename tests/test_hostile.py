"""Named hostile inputs against the real server, each with the exact status and error code.

What the uploads show: the type is sniffed from the bytes (never the name or Content-Type);
decompression bombs and oversized images are 413 before any pixel is decoded; animated and
multi-frame images are refused (400) rather than silently cut to one frame, except an MPO
camera JPEG, which is its first frame; every colour mode becomes RGB at the size the image is
displayed at (EXIF orientation applied). Bodies: non-JSON bodies on JSON routes are 415,
non-finite numbers 422, more points than ``limits.max_points`` 413, broken or oversized RLEs
400/422, ids with path tricks 404. Concurrent history edits on one object stay consistent.
"""

from __future__ import annotations

import asyncio
import io
import json
import posixpath
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from atelier3d.errors import PayloadTooLarge
from atelier3d.imaging import decode_image
from atelier3d.samples import drawn_character
from tests.helpers import assert_error, png_bytes, uploaded

IMAGE = drawn_character(160, 240)
H, W = IMAGE.shape[:2]


@pytest.fixture()
def sid(http):
    with uploaded(http, IMAGE) as session_id:
        yield session_id


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload(http, data: bytes, name: str = "x.png", content_type: str = "application/octet-stream"):
    return http.post("/v1/sessions", files={"image": (name, data, content_type)})


def created(http, data: bytes, **kwargs) -> dict:
    r = upload(http, data, **kwargs)
    assert r.status_code == 201, r.text
    info = r.json()
    http.delete(f"/v1/sessions/{info['session_id']}")
    return info


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    return struct.pack(">I", len(payload)) + kind + payload + crc


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB, with a few bytes of pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


# ---- content types and sniffing ----------------------------------------------------------


def test_json_routes_refuse_other_content_types(http, sid):
    body = json.dumps({"points": [[10, 10]], "labels": [1]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml",
                         "image/png"):
        r = http.post(f"/v1/sessions/{sid}/segment", content=body,
                      headers={"content-type": content_type})
        error = assert_error(r, 415, "unsupported_media_type")
        assert "application/json" in error["message"]
    # A form where JSON belongs, on every JSON route.
    assert_error(http.post(f"/v1/sessions/{sid}/cutout", data={"object_id": "x"}), 415,
                 "unsupported_media_type")
    assert_error(http.post("/v1/jobs/edit", data={"session_id": sid}), 415,
                 "unsupported_media_type")
    assert_error(http.post("/v1/jobs/mesh", content=b"{}", headers={"content-type": "text/csv"}),
                 415, "unsupported_media_type")
    # application/*+json and parameters are JSON.
    r = http.post(f"/v1/sessions/{sid}/segment", content=body,
                  headers={"content-type": "application/vnd.api+json; charset=utf-8"})
    assert r.status_code == 200, r.text
    # JSON sent as an upload is not an image, whatever it claims to be.
    assert_error(http.post("/v1/sessions", content=body, headers={"content-type": "image/png"}),
                 415, "unsupported_media_type")


def test_image_type_is_sniffed_from_the_bytes(http):
    png = png_bytes(IMAGE)
    # A PNG named and typed as a JPEG works; so does a JPEG typed as PNG, raw or multipart.
    assert created(http, png, name="photo.jpg", content_type="image/jpeg")["width"] == W
    jpeg = png_bytes(IMAGE, "JPEG")
    info = http.post("/v1/sessions", content=jpeg, headers={"content-type": "image/png"})
    assert info.status_code == 201 and info.json()["height"] == H
    http.delete(f"/v1/sessions/{info.json()['session_id']}")
    # Text named and typed as a PNG is not an image: 415.
    assert_error(upload(http, b"hello, I am a PNG\n" * 20, name="x.png",
                        content_type="image/png"), 415, "unsupported_media_type")
    # A PNG signature on garbage: 400 (it is a PNG, a broken one), never 500.
    assert upload(http, b"\x89PNG\r\n\x1a\n" + b"\xff" * 200).status_code in (400, 415)
    # A readable format the server does not take (PDF from PIL, ICO): 415.
    ico = encoded(Image.fromarray(IMAGE[:64, :64]), "ICO")
    assert_error(upload(http, ico, name="x.png"), 415, "unsupported_media_type")


def test_corrupted_images_are_4xx_never_500(http):
    """Bytes of valid images of every accepted format, truncated or with bytes flipped."""
    rng = np.random.default_rng(3)
    small = Image.fromarray(IMAGE[:48, :40])
    samples = [encoded(small, fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")]
    statuses = set()
    for data in samples:
        for _ in range(6):
            broken = bytearray(data)
            for i in rng.integers(0, len(broken), 8):
                broken[i] = int(rng.integers(0, 256))
            cut = broken[: int(rng.integers(8, len(broken)))]
            for variant in (bytes(broken), bytes(cut)):
                r = upload(http, variant)
                statuses.add(r.status_code)
                assert r.status_code in (201, 400, 413, 415), r.text
                if r.status_code == 201:
                    http.delete(f"/v1/sessions/{r.json()['session_id']}")
                else:
                    assert set(r.json()["error"]) == {"code", "message"}
    assert statuses & {400, 415}


# ---- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [2500, 10_000, 20_000, 100_000])
def test_decompression_bomb_is_413(http, side):
    """A few hundred bytes declaring side x side pixels: 2500² is over the server's 4 MP limit;
    10000² trips PIL's DecompressionBombWarning, 20000² and up its DecompressionBombError."""
    bomb = declared_png(side, side)
    assert len(bomb) < 200
    start = time.monotonic()
    error = assert_error(upload(http, bomb), 413, "payload_too_large")
    assert "pixels" in error["message"]
    assert time.monotonic() - start < 10  # refused from the header, nothing decoded


def test_pil_bomb_checks_become_413_too():
    """With a limit of our own above PIL's, PIL's bomb guard speaks, and is still our 413."""
    for side in (10_000, 20_000):
        with pytest.raises(PayloadTooLarge):
            decode_image(declared_png(side, side), max_pixels=10**12)


def test_huge_dimensions(http):
    # Over 2^16 on a side is fine in PNG, but the pixel count is not.
    assert_error(upload(http, declared_png(70_000, 100)), 413, "payload_too_large")
    assert_error(upload(http, declared_png(2**31 - 1, 1)), 413, "payload_too_large")
    # Extreme aspect ratios within the pixel limit: up to limits.max_aspect_ratio (1000:1) they
    # are images like any other and segment; beyond, SAM's 1024 frame would be 0 pixels high.
    for shape in ((1, 3000), (4000, 2), (2, 2001)):
        error = assert_error(upload(http, png_bytes(np.full((*shape, 3), 9, np.uint8))), 400,
                             "bad_request")
        assert "1000 times" in error["message"]
    for shape in ((2, 1900), (1500, 2)):
        with uploaded(http, np.full((*shape, 3), 120, np.uint8)) as session_id:
            info = http.get(f"/v1/sessions/{session_id}").json()
            assert (info["height"], info["width"]) == shape and info["embedding"] == "ready"
            r = http.post(f"/v1/sessions/{session_id}/segment",
                          json={"points": [[shape[1] / 2, shape[0] / 2]], "labels": [1]})
            assert r.status_code == 200, r.text
            assert r.json()["masks"][0]["rle"]["size"] == list(shape)


# ---- frames, modes, orientation ------------------------------------------------------------


def frames() -> list[Image.Image]:
    return [Image.fromarray(np.full((24, 32, 3), c, np.uint8)) for c in (40, 200)]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_animated_and_multi_frame_images_are_refused(http, fmt):
    first, second = frames()
    data = encoded(first, fmt, save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2  # APNG for PNG, two pages for TIFF
    error = assert_error(upload(http, data), 400, "bad_request")
    assert "animated or multi-frame" in error["message"]
    # The same format with one frame is fine.
    assert created(http, encoded(first, fmt))["width"] == 32


def test_mpo_camera_jpeg_is_its_first_frame(http):
    first, second = frames()
    data = encoded(first, "MPO", save_all=True, append_images=[second.resize((16, 12))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    info = created(http, data, name="photo.jpg")
    assert (info["width"], info["height"]) == (32, 24)


def full_mask(h: int, w: int) -> dict:
    return {"size": [h, w], "counts": [0, h * w]}


def session_pixels(http, session_id: str) -> np.ndarray:
    """The session's RGB image, read back through a whole-image cut-out."""
    info = http.get(f"/v1/sessions/{session_id}").json()
    r = http.post(f"/v1/sessions/{session_id}/cutout", json={
        "rle": full_mask(info["height"], info["width"]), "crop": False})
    assert r.status_code == 200, r.text
    rgba = np.asarray(Image.open(io.BytesIO(r.content)))
    assert rgba.shape == (info["height"], info["width"], 4)
    return rgba[..., :3]


def mode_images() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """Name -> (file bytes, the RGB the centre pixel must have), 40 x 24 each."""
    size = (40, 24)
    gradient = (np.arange(40, dtype=np.uint16) * 1600)[None].repeat(24, 0)
    gradient[:, 20] = 65535
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 1  # index 1 (red) is transparent: white on the server
    rgba = np.zeros((24, 40, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:, :20, 3] = 255  # left half opaque green, right half transparent
    la = np.dstack([np.full((24, 40), 90, np.uint8), np.full((24, 40), 255, np.uint8)])
    as_float = np.full((24, 40), 0.25, np.float32)
    as_float[0, 0] = 1.0
    return {
        "cmyk_jpeg": (encoded(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG", quality=95),
                      (255, 0, 0)),
        "cmyk_tiff": (encoded(Image.new("CMYK", size, (0, 0, 255, 0)), "TIFF"), (255, 255, 0)),
        "grey16_png": (encoded(Image.fromarray(gradient), "PNG"), (255, 255, 255)),
        "grey_L": (encoded(Image.new("L", size, 77), "PNG"), (77, 77, 77)),
        "grey_alpha_LA": (encoded(Image.fromarray(la, "LA"), "PNG"), (90, 90, 90)),
        "palette": (encoded(palette, "PNG"), (255, 0, 0)),
        "palette_transparent": (encoded(palette_t, "PNG"), (255, 255, 255)),
        "palette_transparent_gif": (encoded(palette_t, "GIF"), (255, 255, 255)),
        "rgba_transparent": (encoded(Image.fromarray(rgba, "RGBA"), "PNG"), (255, 255, 255)),
        "bilevel_1": (encoded(Image.new("1", size, 1), "PNG"), (255, 255, 255)),
        "float_F_tiff": (encoded(Image.fromarray(as_float, "F"), "TIFF"), (64, 64, 64)),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_colour_modes_become_rgb(http, name):
    data, centre = mode_images()[name]
    r = upload(http, data)
    assert r.status_code == 201, r.text
    session_id = r.json()["session_id"]
    try:
        assert (r.json()["width"], r.json()["height"]) == (40, 24)
        pixels = session_pixels(http, session_id)
        assert np.abs(pixels[12, 20].astype(int) - centre).max() <= 6, pixels[12, 20]
        if name == "rgba_transparent":
            assert tuple(pixels[12, 5]) == (0, 255, 0)  # the opaque half is untouched
    finally:
        http.delete(f"/v1/sessions/{session_id}")


def test_exif_orientation_is_applied(http):
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, right half blue, as stored
    stored[:, 20:] = (0, 0, 255)
    image = Image.fromarray(stored)
    for orientation, size, red_at in ((6, (24, 40), (2, 12)),  # 90° clockwise: red on top
                                      (8, (24, 40), (37, 12)),  # 90° anticlockwise: red below
                                      (3, (40, 24), (12, 35))):  # 180°: red on the right
        exif = Image.Exif()
        exif[0x0112] = orientation
        r = upload(http, encoded(image, "JPEG", exif=exif.tobytes(), quality=95),
                   name="rotated.jpg")
        assert r.status_code == 201, r.text
        info = r.json()
        assert (info["width"], info["height"]) == size
        pixels = session_pixels(http, info["session_id"])
        y, x = red_at
        assert pixels[y, x][0] > 200 and pixels[y, x][2] < 60, (orientation, pixels[y, x])
        http.delete(f"/v1/sessions/{info['session_id']}")
    # A broken EXIF block costs the orientation, not the upload.
    jpeg = encoded(image, "JPEG")
    broken = jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\xff\xff\xff\xff" + jpeg[2:]
    assert created(http, broken)["width"] in (24, 40)


# ---- numbers, lists, masks -----------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"points": [[NaN, 10]], "labels": [1]}',
    '{"points": [[10, Infinity]], "labels": [1]}',
    '{"points": [[-Infinity, 10]], "labels": [1]}',
    '{"points": [[1e309, 10]], "labels": [1]}',
    '{"box": [0, 0, 1e999, 10]}',
    '{"box": [NaN, 0, 10, 10]}',
    '{"points": [["10", 10]], "labels": [1], "box": [0, 0, "x", 1]}',
])
def test_non_finite_coordinates_are_422(http, sid, text):
    r = http.post(f"/v1/sessions/{sid}/segment", content=text,
                  headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request")


def test_huge_finite_coordinates_are_400(http, sid):
    for body in ({"points": [[1e308, 10]], "labels": [1]}, {"box": [0, 0, 1e300, 10]},
                 {"points": [[-1e-300, 10]], "labels": [1]}):
        error = assert_error(http.post(f"/v1/sessions/{sid}/segment", json=body), 400,
                             "bad_request")
        assert "outside" in error["message"]


def test_enormous_point_lists_are_413(http, sid):
    many = 50_000  # ~600 KB of JSON: under the body limit, far over limits.max_points (16)
    start = time.monotonic()
    r = http.post(f"/v1/sessions/{sid}/segment",
                  json={"points": [[5, 5]] * many, "labels": [1] * many})
    error = assert_error(r, 413, "payload_too_large")
    assert "16 points" in error["message"]
    assert time.monotonic() - start < 20


def rle_routes(sid: str, rle: dict) -> list[tuple[str, dict]]:
    return [(f"/v1/sessions/{sid}/segment", {"points": [[10, 10]], "labels": [1],
                                              "mask_input": rle}),
            (f"/v1/sessions/{sid}/cutout", {"rle": rle}),
            (f"/v1/sessions/{sid}/parse", {"rle": rle}),
            ("/v1/jobs/edit", {"session_id": sid, "prompt": "red", "mask": rle})]


@pytest.mark.parametrize(("rle", "status"), [
    ({"size": [H + 1, W], "counts": [(H + 1) * W]}, 400),  # not the image's size
    ({"size": [W, H], "counts": [H * W]}, 400),  # transposed
    ({"size": [H, W], "counts": [H * W - 1]}, 400),  # counts sum short
    ({"size": [H, W], "counts": [H * W, 1]}, 400),  # counts sum long
    ({"size": [H, W], "counts": [10**30, -(10**30) + H * W]}, 400),  # gigantic, negative
    ({"size": [H, W], "counts": [2**64]}, 400),
    ({"size": [10**12, 10**12], "counts": [10**24]}, 400),  # gigantic size
    ({"size": [-H, -W], "counts": [H * W]}, 400),
    ({"size": [H, W], "counts": "0" * 1_000_000}, 400),  # a million empty runs
    ({"size": [H, W], "counts": "o" * 1_000_000 + "0"}, 400),  # one run a million chars long
    ({"size": [H, W], "counts": "é"}, 400),
    ({"size": [H, W], "counts": "?"}, 400),  # a run cut short
    ({"size": [H, W], "counts": {"a": 1}}, 422),
    ({"size": [H, W, 3], "counts": [H * W]}, 422),
    ({"size": [H], "counts": [H * W]}, 422),
    ({"counts": [H * W]}, 422),
])
def test_malformed_and_oversize_rle(http, sid, rle, status):
    for path, body in rle_routes(sid, rle):
        start = time.monotonic()
        error = assert_error(http.post(path, json=body), status)
        assert time.monotonic() - start < 10, path
        if status == 400:
            assert "rle" in error["message"].lower() or "mask" in error["message"].lower()


# ---- ids ------------------------------------------------------------------------------------


TRICKS = [
    "..", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "ses_%2F..%2F", "%00", "ses_\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9", "ses_\U0001F600",
    "\u202eses_", "ses_" + "A" * 4000, "~root", "C:%5Cwindows%5Cwin.ini", "ses_*", "%25",
]


def raw_get(base_url: str, path: str) -> httpx.Response:
    """GET ``path`` exactly as written: httpx would normalise the dot segments away."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        request = client.build_request("GET", base_url)
        request.url = request.url.copy_with(raw_path=path.encode("utf-8"))
        return client.send(request)


@pytest.mark.parametrize("trick", TRICKS)
def test_path_tricks_in_ids_are_404(server, sid, trick):
    from urllib.parse import quote

    segment = quote(trick, safe="%/.")
    for path in (f"/v1/sessions/{segment}", f"/v1/jobs/{segment}",
                 f"/v1/jobs/{segment}/result", f"/v1/sessions/{segment}/objects/{segment}",
                 f"/v1/sessions/{sid}/parses/{segment}/parse_map.png",
                 f"/v1/sessions/{sid}/parses/{segment}/parts/{segment}.png"):
        r = raw_get(server, path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        body = r.json()
        if "error" in body:
            assert body["error"]["code"] == "not_found"
        else:  # dot segments took the request out of /v1 (the UI's 404): still no file
            assert not posixpath.normpath(path).startswith("/v1/"), (path, r.text[:300])
        assert b"root:" not in r.content and b"[fonts]" not in r.content


def test_long_ids_in_bodies_are_404_or_422(http, sid):
    for value in ("A" * 100_000, "../" * 1000, "\U0001F600" * 1000):
        assert_error(http.post(f"/v1/sessions/{sid}/segment", json={
            "points": [[10, 10]], "labels": [1], "object_id": value}), 404, "not_found")
        assert_error(http.post("/v1/jobs/edit", json={"session_id": value, "prompt": "x"}),
                     404, "not_found")
        assert_error(http.post(f"/v1/sessions/{sid}/cutout", json={"object_id": value}), 404,
                     "not_found")


# ---- prompts --------------------------------------------------------------------------------


def test_prompt_over_the_limit_is_422(http, sid):
    for field in ("prompt", "negative_prompt"):
        body = {"session_id": sid, "prompt": "red", field: "a" * 2001}
        error = assert_error(http.post("/v1/jobs/edit", json=body), 422, "invalid_request")
        assert field in error["message"] and "2000" in error["message"]
    # A megabyte prompt is refused just the same (under the 4 MB body limit).
    error = assert_error(http.post("/v1/jobs/edit", json={"session_id": sid,
                                                          "prompt": "😀" * 250_000}),
                         422, "invalid_request")
    assert "prompt" in error["message"]
    # A lone surrogate is not text.
    text = json.dumps({"session_id": sid, "prompt": "a"}).replace('"a"', '"a\\ud800"')
    r = http.post("/v1/jobs/edit", content=text, headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request")


def test_unicode_prompts_are_accepted_and_run(http, sid):
    prompt = ("make the coat red 😀👩🏽‍🎨 and add a hat — "
              "اجعل المعطف أحمر \u202bRTL\u202c עברית 日本語の帽子 e\u0301\u200d\ufeff")
    assert len(prompt) <= 2000
    # 2000 characters of emoji is the limit in characters, not bytes: accepted.
    long_emoji = {"session_id": sid, "prompt": "😀" * 2000}
    r = http.post("/v1/jobs/edit", json=long_emoji)
    assert r.status_code == 202, r.text
    assert http.delete(f"/v1/jobs/{r.json()['job_id']}").status_code in (200, 409)
    r = http.post("/v1/jobs/edit", json={"session_id": sid, "prompt": prompt,
                                          "negative_prompt": "غير واضح 🙈", "steps": 1})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        last = [json.loads(line) for line in events.iter_lines() if line.strip()][-1]
    assert last["type"] == "succeeded", last
    assert http.get(f"/v1/jobs/{job_id}/result").headers["content-type"] == "image/png"


def test_unexpected_errors_are_json_500():
    """A bug (not bad input) still answers in the API's error shape, not Starlette's text."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from atelier3d.serve.http import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise ValueError("height and width must be > 0")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal",
                                  "message": "internal server error (ValueError)"}}


# ---- concurrency ----------------------------------------------------------------------------


async def test_concurrent_history_edits_stay_consistent(server, sid):
    async with httpx.AsyncClient(base_url=server, timeout=300) as client:
        oid = (await client.post(f"/v1/sessions/{sid}/objects")).json()["object_id"]
        base = f"/v1/sessions/{sid}/objects/{oid}"
        first = await client.post(f"/v1/sessions/{sid}/segment", json={
            "points": [[80, 120]], "labels": [1], "object_id": oid})
        assert first.status_code == 200

        def request(i: int):
            kind = ("undo", "redo", "segment", "undo", "select", "reset", "redo")[i % 7]
            if kind == "segment":
                return client.post(f"/v1/sessions/{sid}/segment", json={
                    "points": [[20 + i, 30 + 2 * i]], "labels": [1], "object_id": oid,
                    "refine": i % 2 == 0})
            if kind == "select":
                return client.post(f"{base}/select", json={"index": i % 3})
            return client.post(f"{base}/{kind}")

        answers = await asyncio.gather(*(request(i) for i in range(21)))
        statuses = [r.status_code for r in answers]
        # 409: a select or refine that found the object empty (after a concurrent reset/undo).
        assert set(statuses) <= {200, 409}, [r.text for r in answers if r.status_code >= 400]
        for r in answers:
            if r.status_code == 409:
                assert r.json()["error"]["code"] == "conflict"

        state = (await client.get(base)).json()
        assert state["step"] >= 0 and state["can_undo"] == (state["step"] > 0)
        steps = state["step"]
        # Walk the whole history back and forth: every cursor position is a valid state.
        seen = []
        while state["can_undo"]:
            state = (await client.post(f"{base}/undo")).json()
            seen.append(state["step"])
            if state["masks"]:
                assert state["selected"] is not None and 0 <= state["selected"] < 3
                assert len(state["points"]) == len(state["labels"])
        assert seen == list(range(steps - 1, -1, -1))
        while state["can_redo"]:
            state = (await client.post(f"{base}/redo")).json()
        assert state["step"] >= steps
