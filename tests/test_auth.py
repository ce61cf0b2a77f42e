"""Isolation: unguessable ids, API keys, per-key ownership, the UI's login, no file serving.

The app runs here with ``auth`` configured (keys given plainly, as a SHA-256 and in a file; a UI
user): the session's ``server`` fixture owns this process's Ray, so this one runs in a
subprocess (this module as a script) and the tests talk to it over real HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from atelier3d.samples import drawn_character
from tests.helpers import ROOT, driver_env, free_port, png_bytes

pytestmark = pytest.mark.cluster

READY = "AUTH-SERVER-READY"
KEY_A = "alpha-key-0123456789abcdef"  # in auth.api_keys as it is
KEY_B = "bravo-key-0123456789abcdef"  # in auth.api_keys as sha256:<hex>
KEY_C = "charlie-key-0123456789abcdef"  # in auth.api_keys_file
UI_USER, UI_PASSWORD = "ada", "correct horse battery staple"  # as sha256:<hex>
IMAGE = drawn_character(160, 240)
ID = re.compile(r"^(ses|obj|prs|job)_[A-Za-z0-9_-]{24}$")  # 18 bytes of secrets: 144 bits


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def serve(cache_dir: str, port: int, keys_file: str, metrics_port: int) -> None:
    """The subprocess: the app with auth on, until its stdin closes."""
    from atelier3d.serve import runner

    config = runner.load_serve_config(models="tiny", port=port, args_override={
        "cache_dir": cache_dir, "ui": True,
        "limits": {"max_sessions_per_client": 1000},
        "auth": {"api_keys": [KEY_A, sha(KEY_B)], "api_keys_file": keys_file,
                 "ui_users": {UI_USER: sha(UI_PASSWORD)}}})
    runner.start(config, metrics_port=metrics_port)
    try:
        print(READY, flush=True)
        sys.stdin.read()
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def auth_server(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    keys_file = tmp / "keys.txt"
    keys_file.write_text(f"# keys of the test\n\n{KEY_C}  # charlie\n")
    log = tmp / "server.log"
    port, metrics_port = free_port(), free_port()
    env = driver_env()
    env.pop("ATELIER3D_API_KEY", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_auth", str(tiny_dir), str(port), str(keys_file),
             str(metrics_port)], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=out,
            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while READY not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        yield {"url": f"http://127.0.0.1:{port}", "metrics": metrics_port,
               "cache_dir": str(tiny_dir)}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)


def client(url: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, timeout=300, headers=headers)


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    return body["error"]


# ---- (a) ids are capabilities ---------------------------------------------------------------


def test_ids_come_from_secrets_with_144_bits(monkeypatch):
    from atelier3d.serve.sessions import session as sessions

    ids = {sessions.new_id(prefix) for prefix in ("ses", "obj", "job", "prs") * 250}
    assert len(ids) == 1000 and all(ID.match(i) for i in ids)
    asked = []
    real = sessions.secrets.token_urlsafe
    monkeypatch.setattr(sessions.secrets, "token_urlsafe",
                        lambda n: asked.append(n) or real(n))
    sessions.new_id("ses")
    assert asked == [18]  # bytes from the OS CSPRNG: 144 bits >= 128


# ---- (b) API keys ---------------------------------------------------------------------------


def test_every_v1_route_needs_a_key(auth_server):
    url = auth_server["url"]
    spec = httpx.get(f"{url}/openapi.json").json()  # the docs stay open
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    routes = [(method, path) for path, operations in spec["paths"].items()
              if path.startswith("/v1") for method in operations]
    assert len(routes) >= 25
    for key in (None, "wrong-key-0123456789abcdef", KEY_A + "x", KEY_A[:-1]):
        with client(url, key) as http:
            for method, path in routes:
                concrete = re.sub(r"\{[^}]+\}", "x", path)
                r = http.request(method.upper(), concrete, json={})
                error = error_of(r, 401, "unauthorized")
                assert "Authorization: Bearer" in error["message"]
                assert r.headers["www-authenticate"].startswith("Bearer")
    # Another scheme, or the key in the wrong place, is no key.
    for headers in ({"Authorization": f"Basic {KEY_A}"}, {"X-Api-Key": KEY_A},
                    {"Authorization": KEY_A}, {"Authorization": "Bearer"}):
        error_of(httpx.get(f"{url}/v1/sessions/x", headers=headers), 401, "unauthorized")
    assert httpx.get(f"{url}/v1/sessions/x", params={"api_key": KEY_A}).status_code == 401
    # Health stays open.
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.get(f"{url}/docs").status_code == 200


def test_metrics_stay_open(auth_server):
    deadline = time.monotonic() + 120
    while True:
        try:
            r = httpx.get(f"http://127.0.0.1:{auth_server['metrics']}/metrics", timeout=10)
            if r.status_code == 200 and "ray_" in r.text:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the metrics endpoint never answered"
        time.sleep(2)


@pytest.mark.parametrize("key", [KEY_A, KEY_B, KEY_C], ids=["plain", "sha256", "file"])
def test_each_configured_key_works(auth_server, key):
    with client(auth_server["url"], key) as http:
        r = http.post("/v1/sessions", files={"image": ("a.png", png_bytes(IMAGE))})
        assert r.status_code == 201, r.text
        assert ID.match(r.json()["session_id"])
        assert http.delete(f"/v1/sessions/{r.json()['session_id']}").status_code == 204


def test_python_client_and_cli_take_the_key(auth_server, tmp_path, monkeypatch):
    from atelier3d.cli import main
    from atelier3d.clients import ApiError, Client

    url = auth_server["url"]
    monkeypatch.delenv("ATELIER3D_API_KEY", raising=False)
    with Client(url, api_key=KEY_B) as c:
        info = c.create_session(IMAGE)
        assert c.get_session(info.session_id).width == IMAGE.shape[1]
    with Client(url) as c, pytest.raises(ApiError) as refused:
        c.create_session(IMAGE)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    monkeypatch.setenv("ATELIER3D_API_KEY", KEY_B)
    with Client(url) as c:
        assert c.get_session(info.session_id).session_id == info.session_id  # same key: owner

    image = tmp_path / "c.png"
    Image.fromarray(IMAGE).save(image)
    args = [str(image), "--point", "80,120", "--server", url, "-o", str(tmp_path / "o.png")]
    monkeypatch.delenv("ATELIER3D_API_KEY")
    assert main(["segment", *args]) != 0  # no key
    assert main(["segment", *args, "--api-key", KEY_C]) == 0
    assert Image.open(tmp_path / "o.png").mode == "RGBA"
    monkeypatch.setenv("ATELIER3D_API_KEY", KEY_A)
    (tmp_path / "o.png").unlink()
    assert main(["segment", *args]) == 0 and (tmp_path / "o.png").exists()


# ---- (d) one key cannot reach another's sessions and jobs ----------------------------------


def test_keys_cannot_reach_each_others_sessions_and_jobs(auth_server):
    url = auth_server["url"]
    with client(url, KEY_A) as a, client(url, KEY_B) as b:
        sid = a.post("/v1/sessions?wait=true",
                     files={"image": ("a.png", png_bytes(IMAGE))}).json()["session_id"]
        oid = a.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
        assert ID.match(oid)
        seg = a.post(f"/v1/sessions/{sid}/segment",
                     json={"points": [[80, 120]], "labels": [1], "object_id": oid})
        assert seg.status_code == 200, seg.text
        parse = a.post(f"/v1/sessions/{sid}/parse", json={"object_id": oid}).json()
        pid = parse["parse_id"]
        assert ID.match(pid)
        job = a.post("/v1/jobs/mesh", json={
            "session_id": sid, "source": {"kind": "object", "object_id": oid}, "steps": 1,
            "octree_resolution": 32, "texture": False}).json()["job_id"]
        assert ID.match(job)
        rgba = np.zeros((96, 64, 4), np.uint8)
        rgba[20:80, 16:48] = (200, 60, 40, 255)  # a cut-out: an opaque shape on transparency
        submitted = a.post("/v1/jobs/mesh", files={"image": ("c.png", png_bytes(rgba))},
                           data={"request": json.dumps({"steps": 1, "octree_resolution": 32,
                                                        "texture": False})})
        assert submitted.status_code == 202, submitted.text
        upload_job = submitted.json()["job_id"]
        for job_id in (job, upload_job):
            with a.stream("GET", f"/v1/jobs/{job_id}/events") as events:
                assert json.loads(list(events.iter_lines())[-1])["type"] == "succeeded"

        # What B gets for A's ids is exactly what it gets for ids that never existed.
        unknown_session = b.get("/v1/sessions/ses_AAAAAAAAAAAAAAAAAAAAAAAA").json()
        unknown_job = b.get("/v1/jobs/job_AAAAAAAAAAAAAAAAAAAAAAAA").json()
        part = parse["parts"][0]["name"] if parse["parts"] else "x"
        session_calls = [
            ("GET", f"/v1/sessions/{sid}", None), ("DELETE", f"/v1/sessions/{sid}", None),
            ("POST", f"/v1/sessions/{sid}/segment", {"points": [[80, 120]], "labels": [1]}),
            ("POST", f"/v1/sessions/{sid}/cutout", {"object_id": oid}),
            ("GET", f"/v1/sessions/{sid}/embedding", None),
            ("POST", f"/v1/sessions/{sid}/objects/{oid}/steps", {
                "points": [[80, 120]], "labels": [1], "selected": 0,
                "masks": [{"rle": {"size": [1, 1], "counts": [1]}, "score": 0.5}]}),
            ("POST", f"/v1/sessions/{sid}/objects", None),
            ("GET", f"/v1/sessions/{sid}/objects/{oid}", None),
            ("POST", f"/v1/sessions/{sid}/objects/{oid}/undo", None),
            ("POST", f"/v1/sessions/{sid}/objects/{oid}/select", {"index": 0}),
            ("DELETE", f"/v1/sessions/{sid}/objects/{oid}", None),
            ("POST", f"/v1/sessions/{sid}/parse", {"object_id": oid}),
            ("GET", f"/v1/sessions/{sid}/parses/{pid}", None),
            ("GET", f"/v1/sessions/{sid}/parses/{pid}/parse_map.png", None),
            ("GET", f"/v1/sessions/{sid}/parses/{pid}/parts.zip", None),
            ("GET", f"/v1/sessions/{sid}/parses/{pid}/parts/{part}.png", None),
            ("POST", "/v1/jobs/edit", {"session_id": sid, "prompt": "red"}),
            ("POST", "/v1/jobs/mesh", {"session_id": sid, "source": {"kind": "original"}}),
        ]
        for method, path, body in session_calls:
            r = b.request(method, path, json=body)
            assert r.status_code == 404 and r.json() == unknown_session, (method, path, r.text)
        for job_id in (job, upload_job):
            for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/result"),
                                 ("GET", "/result?artifact=shape"), ("DELETE", "")):
                r = b.request(method, f"/v1/jobs/{job_id}{path}")
                assert r.status_code == 404 and r.json() == unknown_job, (path, r.text)

        # A still has everything, untouched by B's attempts.
        assert a.get(f"/v1/sessions/{sid}").json()["objects"] == [oid]
        assert a.get(f"/v1/sessions/{sid}/objects/{oid}").json()["step"] == 1
        assert a.get(f"/v1/jobs/{job}/result").headers["content-type"] == "model/gltf-binary"
        assert a.get(f"/v1/jobs/{upload_job}").json()["status"] == "succeeded"
        assert a.get(f"/v1/sessions/{sid}/parses/{pid}/parse_map.png").status_code == 200

        # Results expire with their session: deleted, its job's result is gone too.
        assert a.delete(f"/v1/sessions/{sid}").status_code == 204
        error_of(a.get(f"/v1/jobs/{job}/result"), 404, "not_found")
        error_of(a.get(f"/v1/sessions/{sid}/parses/{pid}/parse_map.png"), 404, "not_found")


# ---- (c) the UI's login, (e) no files served outside the API -------------------------------


@contextlib.contextmanager
def login(url: str, password: str):
    """An HTTP client that signed in to the UI with ``password`` (or tried to)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/login", data={"username": UI_USER, "password": password})
        assert r.status_code == (200 if password == UI_PASSWORD else 400), r.text
        yield http


def test_ui_needs_its_login(auth_server):
    url = auth_server["url"]
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        assert anonymous.get("/config").status_code == 401
        assert anonymous.get("/gradio_api/info").status_code == 401
        assert anonymous.post("/gradio_api/queue/join", json={}).status_code == 401
        assert anonymous.get("/").status_code == 200  # the page shell, which asks to log in
    with login(url, "wrong password") as refused:
        assert refused.get("/config").status_code == 401
    with login(url, UI_PASSWORD) as user:
        assert user.get("/config").status_code == 200
        # The UI's login is not an API key.
        error_of(user.get("/v1/sessions/x"), 401, "unauthorized")


def test_no_files_are_served_outside_the_api(auth_server, tmp_path):
    """Gradio serves only the files its own events returned: not the weights cache, not the
    working directory, not system files; the API's results live in memory behind /v1."""
    cache = Path(auth_server["cache_dir"])
    weights = next(p for p in cache.rglob("*") if p.is_file())
    with login(auth_server["url"], UI_PASSWORD) as user:
        for target in (weights, cache / "sam", ROOT / "pyproject.toml", Path("/etc/passwd"),
                       Path(sys.executable)):
            for path in (f"/gradio_api/file={target}", f"/file={target}",
                         f"/gradio_api/file/{target}"):
                r = user.get(path)
                assert r.status_code in (403, 404), (path, r.status_code)
                assert b"root:" not in r.content and r.content[:4] != b"PK\x03\x04"
        static = user.get("/gradio_api/file=..%2F..%2F..%2Fetc%2Fpasswd")
        assert static.status_code in (400, 403, 404)
    # And nothing at all without the login.
    with httpx.Client(base_url=auth_server["url"], timeout=60) as anonymous:
        assert anonymous.get(f"/gradio_api/file={weights}").status_code in (401, 403)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
