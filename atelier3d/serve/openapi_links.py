"""OpenAPI links: what the id in a created resource's answer opens next.

A session's upload answers ``session_id``, an object's creation ``object_id``, a job's
submission ``job_id`` (the job also sends ``Location``); these links say which operations take
that id, so that a client generator, or schemathesis' stateful tests, can chain them.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI

SESSION = "/v1/sessions/{session_id}"
OBJECT = "/v1/sessions/{session_id}/objects/{object_id}"
JOB = "/v1/jobs/{job_id}"

_FROM_SESSION = {"session_id": "$response.body#/session_id"}
_FROM_OBJECT = {"session_id": "$request.path.session_id", "object_id": "$response.body#/object_id"}
_FROM_JOB = {"job_id": "$response.body#/job_id"}

# (path, method, status) of the creating operation -> link name -> (path, method, parameters)
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("/v1/sessions", "post", "201"): {
        "GetSession": (SESSION, "get", _FROM_SESSION),
        "DeleteSession": (SESSION, "delete", _FROM_SESSION),
        "AddObject": (f"{SESSION}/objects", "post", _FROM_SESSION),
        "Segment": (f"{SESSION}/segment", "post", _FROM_SESSION),
    },
    (f"{SESSION}/objects", "post", "201"): {
        "GetObject": (OBJECT, "get", _FROM_OBJECT),
        "DeleteObject": (OBJECT, "delete", _FROM_OBJECT),
    },
    **{(f"/v1/jobs/{kind}", "post", "202"): {
        "GetJob": (JOB, "get", _FROM_JOB),
        "CancelJob": (JOB, "delete", _FROM_JOB),
        "JobEvents": (f"{JOB}/events", "get", _FROM_JOB),
        "JobResult": (f"{JOB}/result", "get", _FROM_JOB),
    } for kind in ("edit", "mesh")},
}


def operation_ref(path: str, method: str) -> str:
    """``#/paths/<path as a JSON pointer token, URI-escaped>/<method>``."""
    token = path.replace("~", "~0").replace("/", "~1")
    return f"#/paths/{quote(token, safe='~')}/{method}"


def add_links(schema: dict) -> dict:
    """``schema`` (an OpenAPI document) with the links of ``LINKS`` on the operations it has."""
    paths = schema.get("paths", {})
    for (path, method, status), links in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        response["links"] = {
            name: {"operationRef": operation_ref(target, target_method),
                   "parameters": parameters}
            for name, (target, target_method, parameters) in links.items()
            if target_method in paths.get(target, {})}
    return schema


def document_links(app: FastAPI) -> None:
    """``app``'s OpenAPI carries ``LINKS``."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_links(build())
        return app.openapi_schema

    app.openapi = openapi
