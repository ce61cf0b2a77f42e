"""Schemathesis fuzzing of every ``/v1`` operation, against the app's own OpenAPI, over real HTTP.

Each operation gets schema-valid (positive) and schema-violating (negative) requests; negative
ones are impossible where an operation has only string path parameters (any string is valid),
and those are reported as skipped. Two thirds of the generated requests have their ids (path
parameters and ``session_id`` / ``object_id`` / ``parse_id`` / ``job_id`` / ``part`` fields of
the body) replaced by those of a live fixture (a session with a segmented object, a parse and a
finished mesh job, remade whenever the fuzzer deletes or resets them), and half of those are
also nudged towards validity (``repair``: lengths that must agree, coordinates inside the image,
one mask source, small jobs), so requests reach the code behind the 404s and 422s. Jobs the
fuzzer gets through are cancelled at once (a real edit takes seconds of CPU here). The seed is
fixed, so CI sees the same requests every run.

Assertions, for every response: no 5xx; a 4xx is one the contract lists (plus 405) and its body
is exactly ``{"error": {"code": str, "message": str}}`` as JSON; and schemathesis' own
conformance checks (``CONFORMANCE``): the status is one the operation documents, the content
type one it documents, the body valid against the documented schema.

Stateful: schemathesis' state machine follows the OpenAPI links (``serve/openapi_links.py``:
a created session, object or job's id to the operations that take it), with the same checks;
uploads are replaced by real images so that the links have ids to carry. The number of requests and
the status classes seen are printed (``-s``) and written to ``$ATELIER3D_FUZZ_REPORT`` when set.
``ATELIER3D_FUZZ_EXAMPLES`` (default 30, which keeps the suite within its time) sets the examples
per operation and mode (heavy operations get half), ``ATELIER3D_FUZZ_SEED`` another seed for a
longer exploration.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import requests

from atelier3d.samples import drawn_character
from tests.helpers import png_bytes

pytestmark = pytest.mark.fuzz

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import HypothesisException  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("ATELIER3D_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("ATELIER3D_FUZZ_SEED", "7"))
MIN_REQUESTS = 28 * EXAMPLES  # measured: 2,000+ requests at 70 examples
# The contract's error statuses (docs/architecture.md, http.ERRORS), plus 405 for a wrong method.
DOCUMENTED_4XX = {400, 401, 404, 405, 409, 413, 415, 422, 429}
# Operations that run a model per valid request: fewer examples keep the run in minutes.
HEAVY = {("POST", "/v1/sessions/{session_id}/parse"): 0.5, ("POST", "/v1/jobs/edit"): 0.5,
         ("POST", "/v1/jobs/mesh"): 0.5}
ID_FIELDS = ("session_id", "object_id", "parse_id", "job_id", "part", "name")
IMAGE = drawn_character(160, 240)
_CUTOUT = np.zeros((96, 64, 4), np.uint8)
_CUTOUT[20:80, 16:48] = (200, 60, 40, 255)
CUTOUT_PNG = png_bytes(_CUTOUT)  # an RGBA cut-out, what an uploaded mesh needs
SMALL_MESH = json.dumps({"steps": 1, "octree_resolution": 32, "texture": False})
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_schema_conformance]
STATEFUL_EXAMPLES = int(os.environ.get("ATELIER3D_FUZZ_STATEFUL", "25"))


@dataclass
class Fixture:
    """Live ids the fuzzer substitutes into its requests, kept usable between requests."""

    base_url: str
    ids: dict[str, str] = field(default_factory=dict)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=300)

    def make(self) -> None:
        with self.http() as http:
            sid = http.post("/v1/sessions?wait=true",
                            files={"image": ("f.png", png_bytes(IMAGE))}).json()["session_id"]
            oid = http.post(f"/v1/sessions/{sid}/objects").json()["object_id"]
            self.ids = {"session_id": sid, "object_id": oid}
            self.segment(http)
            self.parse(http)
            job = http.post("/v1/jobs/mesh", json={
                "session_id": sid, "source": {"kind": "object", "object_id": oid},
                "steps": 1, "octree_resolution": 32, "texture": False})
            assert job.status_code == 202, job.text
            job_id = job.json()["job_id"]
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
                for _ in events.iter_lines():
                    pass
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        self.ids["job_id"] = job_id

    def parse(self, http: httpx.Client) -> None:
        parse = http.post(f"/v1/sessions/{self.ids['session_id']}/parse",
                          json={"object_id": self.ids["object_id"]})
        assert parse.status_code == 200, parse.text
        parts = parse.json()["parts"]
        part = parts[0]["name"] if parts else "upper-clothes"
        self.ids.update({"parse_id": parse.json()["parse_id"], "part": part, "name": part})

    def segment(self, http: httpx.Client) -> None:
        seg = http.post(f"/v1/sessions/{self.ids['session_id']}/segment", json={
            "points": [[80, 120]], "labels": [1], "object_id": self.ids["object_id"]})
        assert seg.status_code == 200, seg.text

    def ensure(self) -> None:
        """Remakes what the fuzzer deleted, and gives the object a mask again after a reset."""
        with self.http() as http:
            state = http.get(f"/v1/sessions/{self.ids['session_id']}/objects/"
                             f"{self.ids['object_id']}")
            if state.status_code == 404:
                self.make()
                return
            if state.json()["selected"] is None:
                self.segment(http)
            parse = http.get(f"/v1/sessions/{self.ids['session_id']}/parses/"
                             f"{self.ids['parse_id']}")
            if parse.status_code == 404:  # pushed out by the fuzzer's parses
                self.parse(http)

    def disposable(self, path: str) -> dict[str, str]:
        """Ids for a DELETE: a session or object of its own, so the fixture's survive."""
        with self.http() as http:
            if path == "/v1/sessions/{session_id}":
                created = http.post("/v1/sessions", files={"image": ("d.png", png_bytes(IMAGE))})
                return {**self.ids, "session_id": created.json()["session_id"]}
            created = http.post(f"/v1/sessions/{self.ids['session_id']}/objects")
            return {**self.ids, "object_id": created.json()["object_id"]}


def substitute(value, ids: dict[str, str]):
    """``value`` (a body) with every id field that holds a string replaced by a live id."""
    if isinstance(value, dict):
        return {k: (ids[k] if k in ids and isinstance(v, str) else substitute(v, ids))
                for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, ids) for v in value]
    return value


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def repair(path: str, body, ids: dict[str, str]):
    """Nudges a generated body towards a valid one of the fixture session (only what the schema
    cannot say: lengths that must agree, coordinates inside the image, one mask source, small
    job sizes), so the values the fuzzer chose reach the models."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    h, w = IMAGE.shape[:2]
    if path.endswith("/segment"):
        points = body.get("points")
        if isinstance(points, list) and all(isinstance(p, list) and len(p) == 2
                                            and all(_number(v) for v in p) for p in points):
            body["points"] = [[abs(x) % w, abs(y) % h] for x, y in points][:16]
            labels = [v for v in body.get("labels") or [] if v in (0, 1)]
            body["labels"] = (labels + [1] * len(body["points"]))[:len(body["points"])]
        box = body.get("box")
        if isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box):
            xs = sorted([abs(box[0]) % w, abs(box[2]) % w])
            ys = sorted([abs(box[1]) % h, abs(box[3]) % h])
            body["box"] = [xs[0], ys[0], xs[1] + 1, ys[1] + 1]
        if not body.get("points") and body.get("box") is None:
            body["points"], body["labels"] = [[w / 2, h / 2]], [1]
        if body.get("refine"):
            body["object_id"], body["mask_input"] = ids["object_id"], None
    elif path.endswith(("/cutout", "/parse")):
        if body.get("rle") is not None and body.get("object_id") is not None:
            body["rle"] = None
        if body.get("rle") is None:
            body["object_id"] = ids["object_id"]
    elif path.startswith("/v1/jobs/"):
        for name, top in (("steps", 2), ("width", None), ("height", None),
                          ("octree_resolution", None), ("num_chunks", None),
                          ("guidance_scale", None), ("target_face_count", None)):
            if _number(body.get(name)):
                body[name] = None if top is None else 1 + abs(int(body[name])) % top
        if path.endswith("/mesh") and "image" in body:  # multipart: an upload of a cut-out
            request = body.get("request")
            return {"image": CUTOUT_PNG,
                    "request": request if isinstance(request, str) else SMALL_MESH}
        if path.endswith("/mesh"):
            body["parts"] = None
        body["session_id"] = ids["session_id"]
        body.pop("extra_sources", None)
        source = body.get("source")
        if isinstance(source, dict) and source.get("kind") == "job":  # the fixture's is a mesh
            body["source"] = {"kind": "object", "object_id": ids["object_id"]}
        if path.endswith("/edit") and not str(body.get("prompt") or "").strip():
            body["prompt"] = "make the coat red"
    return body


@dataclass
class Report:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    per_status: Counter = field(default_factory=Counter)
    samples: defaultdict = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def classes(self) -> dict[str, int]:
        out: Counter = Counter()
        for status, n in self.statuses.items():
            out[f"{status // 100}xx"] += n
        return dict(sorted(out.items()))


def content_type(response) -> str:
    """The Content-Type of a ``requests`` or schemathesis response (whose headers are lists)."""
    for name, value in response.headers.items():
        if name.lower() == "content-type":
            return value[0] if isinstance(value, list) else value
    return ""


def check_response(response) -> str | None:
    """What is wrong with an answer, or None."""
    status = response.status_code
    text = response.content[:300].decode(errors="replace")
    if status >= 500:
        return f"server error {status}: {text}"
    if status < 400:
        return None
    if status not in DOCUMENTED_4XX:
        return f"undocumented status {status}: {text}"
    if not content_type(response).startswith("application/json"):
        return f"{status} is not JSON ({content_type(response)}): {text}"
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"{status} body is not JSON: {text}"
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"code", "message"} and isinstance(error["code"], str)
            and isinstance(error["message"], str) and error["code"] and error["message"]):
        return f"{status} body is not {{error: {{code, message}}}}: {text}"
    return None


def conformance(case, response) -> str | None:
    """What schemathesis' ``CONFORMANCE`` checks find wrong with an answer, or None."""
    try:
        case.validate_response(response, checks=CONFORMANCE)
    except Exception as exc:  # noqa: BLE001 - schemathesis' FailureGroup, its text the finding
        return f"conformance: {str(exc)[:800]}"
    return None


def describe(case, response, problem: str) -> str:
    request = response.request if response is not None else None
    body = request.body if request is not None else case.body
    if isinstance(body, bytes):
        body = body[:300]
    elif isinstance(body, str):
        body = body[:300]
    url = request.url if request is not None else f"{case.formatted_path}?{case.query or ''}"
    return f"{case.method} {url} body={body!r} headers={dict(case.headers or {})}: {problem}"


class Fuzzer:
    def __init__(self, base_url: str, seed_value: int = SEED) -> None:
        self.base_url = base_url
        self.seed = seed_value
        self.fixture = Fixture(base_url)
        self.report = Report()
        self.http = requests.Session()

    def run(self, examples: int = EXAMPLES) -> Report:
        schema = schemathesis.openapi.from_url(f"{self.base_url}/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()
                      if op.ok().path.startswith("/v1")]
        self.fixture.make()
        for operation in operations:
            key = (operation.method.upper(), operation.path)
            count = max(5, round(examples * HEAVY.get(key, 1)))
            for mode in (schemathesis.GenerationMode.POSITIVE,
                         schemathesis.GenerationMode.NEGATIVE):
                label = f"{operation.method.upper()} {operation.path}"
                try:
                    self.test(operation, mode, count)()
                except HypothesisException as exc:  # e.g. a mode with nothing to violate
                    self.report.skipped.append(f"{label} {mode.value}: {type(exc).__name__}")
        self.http.close()
        return self.report

    def test(self, operation, mode, count: int):
        """Hypothesis' test of ``operation``: ``count`` cases of ``mode``, one request each."""
        label = f"{operation.method.upper()} {operation.path}"
        deletes = operation.method == "delete" and operation.path.startswith("/v1/sessions")

        @seed(self.seed)
        @settings(max_examples=count, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode),
               live=st.sampled_from(["no", "ids", "repaired"]))
        def run(case, live: str) -> None:
            if live != "no":
                self.fixture.ensure()
                ids = self.fixture.disposable(operation.path) if deletes else self.fixture.ids
                for name in list(case.path_parameters or {}):
                    if name in ids:
                        case.path_parameters[name] = ids[name]
                if isinstance(case.body, dict | list):
                    case.body = substitute(case.body, ids)
                if live == "repaired":
                    case.body = repair(operation.path, case.body, ids)
            try:
                response = case.call(base_url=self.base_url, session=self.http, timeout=120)
            except requests.RequestException as exc:
                self.report.requests += 1
                self.report.statuses[0] += 1
                self.report.failures.append(describe(case, None, f"no answer: {exc!r}"))
                return
            self.record(label, response, case)
            problem = conformance(case, response)
            if problem is not None:
                self.report.failures.append(describe(case, response, problem))
            self.cancel_submitted(response)

        return run

    def record(self, label: str, response, case) -> None:
        report = self.report
        report.requests += 1
        report.statuses[response.status_code] += 1
        report.per_operation[label] += 1
        report.per_status[f"{label} {response.status_code}"] += 1
        if len(report.samples[f"{label} {response.status_code}"]) < 3:
            report.samples[f"{label} {response.status_code}"].append(
                response.content[:200].decode(errors="replace"))
        problem = check_response(response)
        if problem is not None:
            report.failures.append(describe(case, response, problem) if case is not None
                                   else f"{label}: {problem}")

    def cancel_submitted(self, response) -> None:
        """A job the fuzzer got through is cancelled at once (that request counts too)."""
        if response.status_code == 202 and b"job_id" in response.content:
            job_id = json.loads(response.content)["job_id"]
            cancelled = self.http.delete(f"{self.base_url}/v1/jobs/{job_id}", timeout=120)
            self.record("DELETE /v1/jobs/{job_id} (cleanup)", cancelled, None)


def fuzz(base_url: str, examples: int = EXAMPLES, seed_value: int = SEED) -> Report:
    return Fuzzer(base_url, seed_value).run(examples)


def test_fuzz_every_v1_operation(server):
    start = time.monotonic()
    report = fuzz(server)
    elapsed = time.monotonic() - start
    summary = {"requests": report.requests, "status_classes": report.classes(),
               "statuses": dict(sorted(report.statuses.items())),
               "operations": len(report.per_operation), "seconds": round(elapsed, 1),
               "skipped": report.skipped, "failures": len(report.failures)}
    print("FUZZ-REPORT", json.dumps(summary))
    if os.environ.get("ATELIER3D_FUZZ_REPORT"):
        with open(os.environ["ATELIER3D_FUZZ_REPORT"], "w") as f:
            json.dump({**summary, "per_operation": dict(report.per_operation),
                       "per_status": dict(sorted(report.per_status.items())),
                       "failure_list": report.failures}, f, indent=1)
    assert not report.failures, "\n".join(report.failures[:40])
    assert report.requests >= MIN_REQUESTS
    # Every /v1 operation of the contract was exercised.
    assert len(report.per_operation) >= 25, sorted(report.per_operation)
    assert np.all([n > 0 for n in report.per_operation.values()])


def real_uploads(case) -> None:
    """A generated upload (an image that is random bytes) made a real one, so that the links
    from what it creates have ids to carry."""
    path, method = case.operation.path, case.method.upper()
    if method != "POST" or not isinstance(case.body, dict) or "image" not in case.body:
        return
    if path == "/v1/sessions":
        case.body = {"image": png_bytes(IMAGE)}
    elif path == "/v1/jobs/mesh":
        case.body = {"image": CUTOUT_PNG, "request": SMALL_MESH}


def test_stateful_links(server):
    """Schemathesis' state machine over the OpenAPI links, with the conformance checks: every
    response conforms, and links were followed (a created session and job read through them)."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    followed: Counter = Counter()
    failures: list[str] = []

    class Links(schema.as_state_machine()):
        def step(self, input):
            if input.transition is not None and input.is_applied:
                followed[f"{input.case.method.upper()} {input.case.operation.path}"] += 1
            return super().step(input)

        def before_call(self, case) -> None:
            real_uploads(case)

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            problem = check_response(response) or conformance(case, response)
            if problem is not None:
                failures.append(describe(case, response, problem))

    start = time.monotonic()
    Links.run(settings=settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=6,
                                deadline=None, database=None, derandomize=True,
                                suppress_health_check=list(HealthCheck)))
    print("STATEFUL-REPORT", json.dumps({"followed": dict(followed), "failures": len(failures),
                                         "seconds": round(time.monotonic() - start, 1)}))
    assert not failures, "\n".join(failures[:40])
    # Links from a created session and from a submitted job were both followed.
    assert any("{session_id}" in op for op in followed), followed
    assert any("{job_id}" in op for op in followed), followed
