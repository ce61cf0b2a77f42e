"""The clients' retries and event-stream resumption, against a real local HTTP server that
answers from a script: 429s, 503s, dropped connections, a port that opens late and an event
stream cut mid-job."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from atelier3d.clients.client import ApiError, AsyncClient, Client

READY = {"ready": True, "weights": "untrained", "models": {}}
EVENTS = [{"seq": i, "job_id": "j1", "status": "running", "type": "progress", "stage": "denoise",
           "step": i + 1, "total": 4} for i in range(3)] + [
    {"seq": 3, "job_id": "j1", "status": "succeeded", "type": "succeeded"}]


class Script(BaseHTTPRequestHandler):
    """Answers each path with the next item of ``server.plan[path]`` (the last one repeats):
    an (status, headers) pair, "drop" (close without answering) or "cut" (events 0-1, then
    close mid-body)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        url = urlsplit(self.path)
        self.server.seen.append((self.command, url.path, parse_qs(url.query)))
        if length := int(self.headers.get("Content-Length") or 0):
            self.rfile.read(length)
        plan = self.server.plan[url.path]
        step = plan.pop(0) if len(plan) > 1 else plan[0]
        if step == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if url.path.endswith("/events"):
            after = int(parse_qs(url.query).get("after", ["-1"])[0])
            self._events([e for e in EVENTS if e["seq"] > after], cut=step == "cut")
            return
        status, headers, body = step
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json",
                            "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _events(self, events: list[dict], cut: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events[:2] if cut else events:
            line = (json.dumps(event) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        if cut:  # no closing chunk: the client sees the body end early
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = _answer


def error(status: int, **headers: str) -> tuple:
    return status, headers, {"error": {"code": "busy", "message": "try later"}}


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    server.plan, server.seen = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client_of(server: ThreadingHTTPServer, **options) -> Client:
    return Client(f"http://127.0.0.1:{server.server_address[1]}", backoff_s=0.01, **options)


def paths(server: ThreadingHTTPServer) -> list[str]:
    return [path for _, path, _ in server.seen]


def test_429_is_retried_for_every_call_and_503_only_for_repeatable_ones(scripted):
    scripted.plan = {
        "/readyz": [error(429, **{"Retry-After": "0"}), error(429), (200, {}, READY)],
        "/v1/sessions/s1/objects": [error(429), error(503, **{"Retry-After": "0"}),
                                    (200, {}, {})],
    }
    with client_of(scripted) as client:
        assert client.ready().ready
        assert paths(scripted).count("/readyz") == 3
        # Creating an object is not repeatable: a 429 (refused unread) is retried, a 503 not.
        with pytest.raises(ApiError) as refused:
            client.create_object("s1")
        assert refused.value.status == 503
        assert paths(scripted).count("/v1/sessions/s1/objects") == 2

    scripted.plan["/readyz"] = [error(429)]
    with client_of(scripted, retries=2) as client, pytest.raises(ApiError) as limited:
        client.ready()
    assert limited.value.status == 429


def test_dropped_connections_are_retried_only_where_repeating_is_safe(scripted):
    scripted.plan = {"/healthz": ["drop", "drop", (200, {}, {"status": "ok"})],
                     "/v1/sessions/s1/objects": ["drop", (200, {}, {})]}
    with client_of(scripted) as client:
        assert client.health() == {"status": "ok"}
        assert paths(scripted).count("/healthz") == 3
        with pytest.raises(httpx.TransportError):
            client.create_object("s1")
        assert paths(scripted).count("/v1/sessions/s1/objects") == 1


def test_a_server_that_starts_late_is_waited_for():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server: list[ThreadingHTTPServer] = []

    def start_later() -> None:
        time.sleep(0.3)
        late = ThreadingHTTPServer(("127.0.0.1", port), Script)
        late.plan, late.seen = {"/healthz": [(200, {}, {"status": "ok"})]}, []
        server.append(late)
        late.serve_forever()

    threading.Thread(target=start_later, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{port}", backoff_s=0.1, retries=6) as client:
            assert client.health() == {"status": "ok"}
    finally:
        for late in server:
            late.shutdown()
            late.server_close()
    with Client(f"http://127.0.0.1:{port}", backoff_s=0.01, retries=1) as client, \
            pytest.raises(httpx.ConnectError):
        client.health()


def test_a_cut_event_stream_resumes_after_the_last_event(scripted):
    scripted.plan = {"/v1/jobs/j1/events": ["cut", "ok"]}
    with client_of(scripted) as client:
        events = list(client.job_events("j1"))
    assert [e["seq"] for e in events] == [0, 1, 2, 3]
    assert [query["after"] for _, _, query in scripted.seen] == [["-1"], ["1"]]


async def test_the_async_client_resumes_and_retries_too(scripted):
    scripted.plan = {"/v1/jobs/j1/events": ["cut", "cut", "ok"],
                     "/readyz": [error(429), "drop", (200, {}, READY)]}
    async with AsyncClient(f"http://127.0.0.1:{scripted.server_address[1]}",
                           backoff_s=0.01) as client:
        events = [event async for event in client.job_events("j1")]
        assert (await client.ready()).ready
    assert [e["seq"] for e in events] == [0, 1, 2, 3]
    afters = [query["after"] for _, path, query in scripted.seen if path.endswith("/events")]
    assert afters == [["-1"], ["1"]]  # the second cut came after the last event


def test_a_stream_that_keeps_failing_gives_up(scripted):
    scripted.plan = {"/v1/jobs/j1/events": ["drop"]}
    with client_of(scripted, retries=2) as client, pytest.raises(httpx.TransportError):
        list(client.job_events("j1"))
    assert len(scripted.seen) == 3
