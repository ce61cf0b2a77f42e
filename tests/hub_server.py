"""A local Hugging Face Hub for tests: the endpoints huggingface_hub and ``models pull`` use, on
loopback, serving files from memory.

- ``GET /api/models/{repo}[/revision/{rev}][?blobs=true]``: model info, with each file's size,
  git blob id and, for LFS files, sha256 (``HfApi.model_info(files_metadata=True)``).
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob id) and,
  for LFS files, ``X-Linked-Etag`` / ``X-Linked-Size`` (their sha256 and size) and a 302 to
  ``/lfs/{sha256}`` on GET, as the hub redirects to its CDN.
- ``HEAD|GET /files/{name}``: plain files by URL (the SAM checkpoint).
- ``GET /simple/{project}/`` and ``/packages/{wheel}``: a PEP 503 package index (``pip download``).

File bodies honour ``Range: bytes=N-`` (206 + ``Content-Range``). Every request is logged with
the bytes its body carried. ``stall(name, n)`` makes the server send ``n`` bytes of that file's
body and then hold the connection until ``release()``: a download caught halfway. With
``keepalive_s`` it sends one more byte that often while it holds, so a client's read timeout
(a minute for ``models pull``) never ends the wait.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt", ".onnx", ".tflite", ".whl")
_BLOCK = 64 * 1024


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Transfer:
    """One request as the server saw it."""

    method: str
    path: str
    range_start: int = 0
    status: int = 0
    body_bytes: int = 0  # grows while the body is being sent


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        listing = "".join(f"{name}:{git_oid(data)}\n" for name, data in sorted(self.files.items()))
        self.commit = hashlib.sha1(listing.encode()).hexdigest()

    @staticmethod
    def is_lfs(name: str, data: bytes) -> bool:
        return name.endswith(LFS_SUFFIXES) or len(data) > 10 * 2**20

    def siblings(self, blobs: bool) -> list[dict]:
        out = []
        for name, data in sorted(self.files.items()):
            entry: dict = {"rfilename": name}
            if blobs:
                entry |= {"size": len(data), "blobId": git_oid(data)}
                if self.is_lfs(name, data):
                    entry["lfs"] = {"size": len(data), "pointerSize": 134,
                                    "sha256": hashlib.sha256(data).hexdigest()}
            out.append(entry)
        return out


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # /files/{name}
    packages: dict[str, dict[str, bytes]] = field(default_factory=dict)  # project -> wheels
    stall_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes, then hold
    keepalive_s: float | None = None  # while holding: a byte this often (None: silence)
    log: list[Transfer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._release = threading.Event()
        self._lfs = {hashlib.sha256(data).hexdigest(): (name, data)
                     for repo in self.repos.values() for name, data in repo.files.items()
                     if Repo.is_lfs(name, data)}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # the Transfer log says it all
                pass

            def do_HEAD(self) -> None:
                server._handle(self, "HEAD")

            def do_GET(self) -> None:
                server._handle(self, "GET")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def stall(self, name: str, after_bytes: int, keepalive_s: float | None = None) -> None:
        """The next body of ``name`` stops after ``after_bytes`` until :meth:`release` (sending
        a byte every ``keepalive_s`` meanwhile, where given)."""
        self._release.clear()
        self.stall_after[name] = after_bytes
        self.keepalive_s = keepalive_s

    def release(self) -> None:
        """Lets stalled bodies go on (to a client that may be gone) and stalls no more."""
        self.stall_after.clear()
        self._release.set()

    def gets(self, suffix: str = "") -> list[Transfer]:
        return [t for t in self.log if t.method == "GET" and t.path.endswith(suffix)]

    # ---- handling ----

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        path = unquote(split.path)
        transfer = Transfer(method=method, path=path)
        self.log.append(transfer)
        try:
            self._route(handler, transfer, path, parse_qs(split.query))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (killed mid-download)

    def _route(self, handler, transfer: Transfer, path: str, query: dict) -> None:
        if path.startswith("/api/models/"):
            return self._model_info(handler, transfer, path[len("/api/models/"):], query)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, name = rest.split("/", 1)
            repo = self.repos.get(repo_id)
            if repo is None or revision not in ("main", repo.commit) or name not in repo.files:
                return self._send(handler, transfer, 404, b"not found", {})
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{git_oid(data)}"'}
            if Repo.is_lfs(name, data):
                sha256 = hashlib.sha256(data).hexdigest()
                headers |= {"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))}
                if transfer.method == "GET":  # as the hub hands LFS bodies to its CDN
                    return self._send(handler, transfer, 302, b"",
                                      headers | {"Location": f"/lfs/{sha256}"})
            return self._send_file(handler, transfer, name, data, headers)
        if path.startswith("/lfs/") and path[len("/lfs/"):] in self._lfs:
            name, data = self._lfs[path[len("/lfs/"):]]
            return self._send_file(handler, transfer, name, data, {})
        if path.startswith("/files/") and path[len("/files/"):] in self.files:
            name = path[len("/files/"):]
            return self._send_file(handler, transfer, name, self.files[name], {})
        if path.startswith("/simple/"):
            project = path[len("/simple/"):].strip("/")
            links = "".join(
                f'<a href="/packages/{html.escape(n)}#sha256={hashlib.sha256(d).hexdigest()}">'
                f"{html.escape(n)}</a>\n" for n, d in self.packages.get(project, {}).items())
            status = 200 if project in self.packages else 404
            body = f"<!DOCTYPE html><html><body>\n{links}</body></html>".encode()
            return self._send(handler, transfer, status, body, {"Content-Type": "text/html"})
        if path.startswith("/packages/"):
            name = path[len("/packages/"):]
            for wheels in self.packages.values():
                if name in wheels:
                    return self._send_file(handler, transfer, name, wheels[name], {})
        return self._send(handler, transfer, 404, b"not found", {})

    def _model_info(self, handler, transfer: Transfer, rest: str, query: dict) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = self.repos.get(repo_id)
        if repo is None or revision not in ("", "main", repo.commit):
            body = json.dumps({"error": "Repository not found"}).encode()
            return self._send(handler, transfer, 404, body,
                              {"Content-Type": "application/json",
                               "X-Error-Code": "RepoNotFound"})
        info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                "siblings": repo.siblings(blobs=query.get("blobs") == ["true"]
                                          or query.get("blobs") == ["True"])}
        self._send(handler, transfer, 200, json.dumps(info).encode(),
                   {"Content-Type": "application/json", "X-Repo-Commit": repo.commit})

    def _send(self, handler, transfer: Transfer, status: int, body: bytes,
              headers: dict[str, str]) -> None:
        transfer.status = status
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if transfer.method == "GET" and body:
            handler.wfile.write(body)
            transfer.body_bytes = len(body)

    def _send_file(self, handler, transfer: Transfer, name: str, data: bytes,
                   headers: dict[str, str]) -> None:
        start = 0
        requested = handler.headers.get("Range", "")
        if requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes="):-1])
        if start >= len(data) and start:
            return self._send(handler, transfer, 416, b"",
                              headers | {"Content-Range": f"bytes */{len(data)}"})
        transfer.range_start = start
        transfer.status = 206 if start else 200
        handler.send_response(transfer.status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if transfer.method == "HEAD":
            return
        stall = self.stall_after.get(name)
        offset = start
        while offset < len(data):
            end = min(len(data), offset + _BLOCK)
            if stall is not None and offset < stall <= end:
                end = stall
            handler.wfile.write(data[offset:end])
            transfer.body_bytes += end - offset
            offset = end
            if stall is not None and offset == stall:
                handler.wfile.flush()
                while not self._release.wait(self.keepalive_s) and offset < len(data) - 1:
                    handler.wfile.write(data[offset:offset + 1])  # still here: one byte
                    handler.wfile.flush()
                    transfer.body_bytes += 1
                    offset += 1
