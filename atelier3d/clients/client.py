"""Python clients of the ``/v1`` HTTP API: :class:`Client` (sync) and :class:`AsyncClient`.

Both clients share everything but the sending: each endpoint is one module-level function that
builds a :class:`Call` (method, URL, httpx keyword arguments and the parser of the answer), and
the endpoint methods live once, in :class:`_Endpoints`. ``Client._send`` returns the parsed
result; ``AsyncClient._send`` is a coroutine, so the same methods of ``AsyncClient`` return
awaitables::

    with Client("http://127.0.0.1:8000") as client:
        info = client.create_session("character.png", wait=True)
        result = client.segment(info.session_id, points=[(190, 120)])
        png = client.cutout(info.session_id, rle=result.masks[result.selected].rle)
        parsed = client.parse(info.session_id, rle=result.masks[result.selected].rle)
        parse_map = client.parse_asset(parsed.parse_map_url)

    async with AsyncClient("http://127.0.0.1:8000") as client:
        info = await client.create_session(image_array, wait=True)

Request bodies are the server's own pydantic models (:mod:`atelier3d.serve.schemas`), so an
invalid prompt fails here, before any request, with a ``ValueError`` (pydantic's
``ValidationError``). Errors the server answers (``{"error": {"code", "message"}}``) raise
:class:`ApiError`. Retried a bounded number of times, after ``Retry-After`` or a growing backoff:
429 answers and connections that could not be made (the server did nothing), and 503 answers
carrying ``Retry-After`` and dropped connections for requests that may be repeated (reads, and
submissions, which carry an idempotency key). A dropped job event stream resumes after the last
event it delivered.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import (
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    TypeVar,
    get_args,
    get_type_hints,
)
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import BaseModel

from atelier3d.api.character import CharacterJobRequest
from atelier3d.api.common import RLE, ImageSource, ReadyInfo
from atelier3d.api.edit import EditJobRequest
from atelier3d.api.jobs import JobState, JobSubmitted
from atelier3d.api.mesh import MeshJobRequest, MeshPart
from atelier3d.api.parse import ParseRequest, ParseResponse, PartGroup
from atelier3d.api.recipe import Recipe, ReplayResponse
from atelier3d.api.segment import (
    CutoutRequest,
    MaskCandidate,
    ObjectState,
    SegmentRequest,
    SegmentResponse,
    SelectRequest,
    SessionInfo,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
USER_AGENT = "atelier3d-client/1"
API_KEY_ENV = "ATELIER3D_API_KEY"  # the API key when none is given

ImageInput = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray
RLEInput = Any  # RLE | MaskCandidate | dict | np.ndarray (a boolean mask)


class ApiError(Exception):
    """An error answer of the server: HTTP ``status``, machine ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


T = TypeVar("T")
P = ParamSpec("P")


# ---- request building ------------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and how to read its answer; ``retry`` says a 503 may be retried."""

    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    kwargs: dict[str, Any] = field(default_factory=dict)
    retry: bool = True


def _seg(value: str) -> str:
    """One URL path segment: ids are quoted so they can never change the route."""
    return quote(str(value), safe="")


def _session_url(session_id: str, *rest: str) -> str:
    return "/".join(["/v1/sessions", _seg(session_id), *rest])


def _object_url(session_id: str, object_id: str, *rest: str) -> str:
    return _session_url(session_id, "objects", _seg(object_id), *rest)


def _json_body(model: BaseModel) -> dict[str, Any]:
    return {"json": model.model_dump(mode="json", exclude_none=True)}


def image_bytes(image: ImageInput) -> tuple[str, bytes]:
    """``(file name, bytes)`` of an image given as a path, encoded bytes, PIL image or array.

    Arrays are ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 (or bool) and go as PNG, as do
    PIL images; paths and bytes are sent as they are (the server sniffs the format).
    """
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        return "image", bytes(image)
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[2] not in (3, 4)
        ):
            raise ValueError(
                f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), "
                f"not {image.dtype} {image.shape}"
            )
        image = Image.fromarray(np.ascontiguousarray(image))
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    raise TypeError(
        f"image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}"
    )


def as_rle(mask: RLEInput) -> RLE:
    """An :class:`RLE` from an RLE (model or dict), a :class:`MaskCandidate` or a bool mask."""
    if isinstance(mask, RLE):
        return mask
    if isinstance(mask, MaskCandidate):
        return mask.rle
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be (H, W), not {mask.shape}")
        from atelier3d import rle as rle_codec

        return RLE(**rle_codec.encode(mask.astype(bool)[None])[0])
    if isinstance(mask, dict):
        return RLE.model_validate(mask)
    raise TypeError(f"cannot use a {type(mask).__name__} as a mask")


def mask_to_array(mask: RLEInput, size: tuple[int, int] | None = None) -> np.ndarray:
    """The ``(H, W)`` bool array of an RLE (model or dict) or a :class:`MaskCandidate`.

    ``size`` is ``(height, width)``; by default the RLE's own size.
    """
    rle = as_rle(mask)
    from atelier3d import rle as rle_codec

    try:
        return rle_codec.decode(rle.model_dump(), tuple(size or rle.size))
    except Exception as exc:  # the codec raises the server's 4xx errors on malformed input
        raise ValueError(f"cannot decode the RLE: {exc}") from exc


# ---- response parsing ------------------------------------------------------------------------


def _error_of(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` of a non-2xx answer, from its ``{"error": ...}`` body if any."""
    code, message = f"http_{response.status_code}", response.reason_phrase or "HTTP error"
    try:
        body = response.json()
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        if text:
            message = text[:500]
    return ApiError(response.status_code, code, message, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds of ``Retry-After`` (a number or an HTTP date), or None without a usable one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    raise _error_of(response)


def _model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        return model.model_validate_json(_checked(response).content)

    return parse


def _no_content(response: httpx.Response) -> None:
    _checked(response)


def _content(response: httpx.Response) -> bytes:
    return _checked(response).content


def _json(response: httpx.Response) -> Any:
    return json.loads(_checked(response).content)


# ---- one function per endpoint ---------------------------------------------------------------


def create_session_call(image: ImageInput, wait: bool = False) -> Call[SessionInfo]:
    name, data = image_bytes(image)
    # Not retried: a 503 (encoding timed out while waiting) comes after the session was made.
    return Call("POST", "/v1/sessions", _model(SessionInfo),
                {"files": {"image": (name, data, "application/octet-stream")},
                 "params": {"wait": "true" if wait else "false"}},
                retry=False)


def get_session_call(session_id: str) -> Call[SessionInfo]:
    return Call("GET", _session_url(session_id), _model(SessionInfo))


def delete_session_call(session_id: str) -> Call[None]:
    return Call("DELETE", _session_url(session_id), _no_content)


def segment_call(
    session_id: str,
    points: Sequence[Sequence[float]] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    box: Sequence[float] | np.ndarray | None = None,
    mask_input: RLEInput | None = None,
    refine: bool = False,
    multimask: bool = True,
    object_id: str | None = None,
) -> Call[SegmentResponse]:
    point_list = [] if points is None else np.asarray(points, np.float64).reshape(-1, 2).tolist()
    if labels is None:
        label_list = [1] * len(point_list)  # foreground by default
    else:
        label_list = [int(v) for v in np.asarray(labels).reshape(-1)]
    request = SegmentRequest(
        points=[tuple(p) for p in point_list],
        labels=label_list,
        box=None if box is None else tuple(np.asarray(box, np.float64).reshape(4).tolist()),
        mask_input=None if mask_input is None else as_rle(mask_input),
        refine=refine,
        multimask=multimask,
        object_id=object_id,
    )
    return Call("POST", _session_url(session_id, "segment"), _model(SegmentResponse),
                _json_body(request))


def cutout_call(
    session_id: str,
    rle: RLEInput | None = None,
    object_id: str | None = None,
    background: Literal["transparent", "white", "black"] = "transparent",
    crop: bool = True,
) -> Call[bytes]:
    request = CutoutRequest(rle=None if rle is None else as_rle(rle), object_id=object_id,
                            background=background, crop=crop)
    return Call("POST", _session_url(session_id, "cutout"), _content, _json_body(request))


def create_object_call(session_id: str) -> Call[ObjectState]:
    # Not retried: creating twice would leave an orphan object (the server never 503s here).
    return Call("POST", _session_url(session_id, "objects"), _model(ObjectState), retry=False)


def get_object_call(session_id: str, object_id: str) -> Call[ObjectState]:
    return Call("GET", _object_url(session_id, object_id), _model(ObjectState))


def delete_object_call(session_id: str, object_id: str) -> Call[None]:
    return Call("DELETE", _object_url(session_id, object_id), _no_content)


def select_call(session_id: str, object_id: str, index: int) -> Call[ObjectState]:
    return Call("POST", _object_url(session_id, object_id, "select"), _model(ObjectState),
                _json_body(SelectRequest(index=index)))


def edit_object_call(session_id: str, object_id: str,
                     action: Literal["undo", "redo", "reset"]) -> Call[ObjectState]:
    if action not in ("undo", "redo", "reset"):
        raise ValueError(f"unknown object action {action!r}")
    # Not retried: undo/redo are not idempotent (the server never 503s here).
    return Call("POST", _object_url(session_id, object_id, action), _model(ObjectState),
                retry=False)


def parse_call(
    session_id: str,
    object_id: str | None = None,
    rle: RLEInput | None = None,
    groups: Sequence[PartGroup] | None = None,
    complete_occlusions: bool | None = None,
) -> Call[ParseResponse]:
    request = ParseRequest(rle=None if rle is None else as_rle(rle), object_id=object_id,
                           groups=None if groups is None else list(groups),
                           complete_occlusions=complete_occlusions)
    return Call("POST", _session_url(session_id, "parse"), _model(ParseResponse),
                _json_body(request))


def get_parse_call(session_id: str, parse_id: str) -> Call[ParseResponse]:
    return Call("GET", _session_url(session_id, "parses", _seg(parse_id)), _model(ParseResponse))


def parse_asset_call(url: str) -> Call[bytes]:
    """GET of a URL a :class:`ParseResponse` names (``parse_map_url``, ``parts[i].url``...)."""
    if not url.startswith("/v1/sessions/"):
        raise ValueError(f"not a parse result URL of this API: {url!r}")
    return Call("GET", url, _content)


def _idempotent(key: str | None) -> dict[str, Any]:
    """Every submission carries an Idempotency-Key (a fresh one by default), so retrying it
    after a 503 or a lost answer can never start the job twice."""
    import uuid

    return {"Idempotency-Key": key or uuid.uuid4().hex}


SourceInput = Any  # ImageSource | dict


def submit_edit_call(session_id: str, prompt: str = "", preset: str = "free",
                     source: SourceInput | None = None, idempotency_key: str | None = None,
                     **params: Any) -> Call[JobSubmitted]:
    """``params``: extra_sources, negative_prompt, mask (RLE input), seed, steps,
    true_cfg_scale, width, height."""
    if params.get("mask") is not None:
        params["mask"] = as_rle(params["mask"])
    request = EditJobRequest(session_id=session_id, prompt=prompt, preset=preset,
                             source=source or ImageSource(), **params)
    return Call("POST", "/v1/jobs/edit", _model(JobSubmitted),
                {**_json_body(request), "headers": _idempotent(idempotency_key)})


def submit_mesh_call(session_id: str | None = None, image: ImageInput | None = None,
                     source: SourceInput | None = None,
                     parts: Sequence[MeshPart | dict] | None = None,
                     idempotency_key: str | None = None, **params: Any) -> Call[JobSubmitted]:
    """A mesh of a session's source (or ``parts``), or of an uploaded ``image`` with alpha.
    ``params``: seed, steps, guidance_scale, octree_resolution, num_chunks, target_face_count,
    texture."""
    fields: dict[str, Any] = {"session_id": session_id, "parts": parts, **params}
    if source is not None:
        fields["source"] = source
    request = MeshJobRequest(**fields)
    headers = _idempotent(idempotency_key)
    if image is None:
        return Call("POST", "/v1/jobs/mesh", _model(JobSubmitted),
                    {**_json_body(request), "headers": headers})
    name, data = image_bytes(image)
    body = request.model_dump_json(exclude_none=True)
    return Call("POST", "/v1/jobs/mesh", _model(JobSubmitted),
                {"files": {"image": (name, data, "application/octet-stream")},
                 "data": {"request": body}, "headers": headers})


def submit_character_call(session_id: str, object_id: str,
                          garments: Sequence[str] = (), idempotency_key: str | None = None,
                          **params: Any) -> Call[JobSubmitted]:
    """Character to 3D of a segmented character. ``params``: t_pose, hair, edit (seed, steps,
    true_cfg_scale, width, height), mesh (the mesh parameters), resume_from, previous_job_id,
    reuse (a :class:`CharacterResults`)."""
    request = CharacterJobRequest(object_id=object_id, garments=list(garments), **params)
    return Call("POST", _session_url(session_id, "character3d"), _model(JobSubmitted),
                {**_json_body(request), "headers": _idempotent(idempotency_key)})


def _job_url(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/jobs", _seg(job_id), *rest])


def get_job_call(job_id: str) -> Call[JobState]:
    return Call("GET", _job_url(job_id), _model(JobState))


def cancel_job_call(job_id: str) -> Call[JobState]:
    return Call("DELETE", _job_url(job_id), _model(JobState))


def job_result_call(job_id: str, format: str | None = None,
                    artifact: str | None = None) -> Call[bytes]:
    params = {k: v for k, v in (("format", format), ("artifact", artifact)) if v is not None}
    return Call("GET", _job_url(job_id, "result"), _content, {"params": params})


class ProgressBar:
    """A one-line text progress bar on stderr for a job's events (``--progress`` in the CLI)."""

    def __init__(self, label: str, stream: Any = None, width: int = 30) -> None:
        import sys

        self.label, self.stream, self.width = label, stream or sys.stderr, width

    def __call__(self, event: dict) -> None:
        done = round(self.width * float(event.get("progress", 0.0)))
        bar = "#" * done + "." * (self.width - done)
        what = event.get("stage") or event["type"]
        if event.get("total"):
            what += f" {event['step']}/{event['total']}"
        if event.get("queue_position") is not None and event["type"] == "queued":
            what = f"queued, {event['queue_position']} ahead"
        eta = event.get("eta_s")
        tail = f" ETA {eta:.0f}s" if eta and event["type"] not in JOB_ENDS else ""
        self.stream.write(f"\r{self.label} [{bar}] {event.get('progress', 0):4.0%} "
                          f"{what}{tail}\x1b[K")
        if event["type"] in JOB_ENDS:
            self.stream.write("\n")
        self.stream.flush()


JOB_ENDS = ("succeeded", "failed", "cancelled")
# Transport errors: the request never reached the server, or the connection dropped after it was
# sent (the server may have acted on it).
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _event_of(line: str) -> dict | None:
    return json.loads(line) if line.strip() else None


def _followed(event: dict, job_id: str, progress: Callable[[dict], None] | None) -> bool:
    """Shows ``event`` to ``progress``; True at the job's last event; raises :class:`ApiError`
    if the job failed or was cancelled."""
    if progress is not None:
        progress(event)
    if event["type"] not in JOB_ENDS:
        return False
    if event["type"] != "succeeded":
        error = event.get("error") or {"code": "cancelled", "message": "the job was cancelled"}
        raise ApiError(409, f"job_{event['type']}", f"job {job_id}: {error['message']}")
    return True


def export_recipe_call(session_id: str) -> Call[Recipe]:
    return Call("GET", _session_url(session_id, "recipe"), _model(Recipe))


def replay_call(recipe: Recipe | dict, image: ImageInput) -> Call[ReplayResponse]:
    """A new session of ``image`` with the recipe's clicks and parses done and its jobs
    submitted (they run as ordinary jobs: follow them with ``wait_job``)."""
    text = Recipe.model_validate(recipe).model_dump_json(exclude_none=True)
    name, data = image_bytes(image)
    return Call("POST", "/v1/recipes/replay", _model(ReplayResponse),
                {"files": {"image": (name, data, "application/octet-stream"),
                           "recipe": ("recipe.json", text.encode(), "application/json")}},
                retry=False)


def ready_call() -> Call[ReadyInfo]:
    return Call("GET", "/readyz", _model(ReadyInfo))


def health_call() -> Call[dict]:
    return Call("GET", "/healthz", _json)


# ---- the clients -----------------------------------------------------------------------------


def _endpoint(build: Callable[P, Call[T]], doc: str | None = None
              ) -> Callable[Concatenate[Any, P], T]:
    """The client method of an endpoint: the same arguments as ``build``, whose call it sends
    (and, in :class:`AsyncClient`, awaits)."""
    def method(self: Any, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send(build(*args, **kwargs))

    method.__name__ = method.__qualname__ = build.__name__.removesuffix("_call")
    method.__doc__ = doc
    signature = inspect.signature(build)
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    [result] = get_args(get_type_hints(build)["return"])  # Call[result]
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_parameter, *signature.parameters.values()], return_annotation=result)
    return method


class _Endpoints:
    """The endpoint methods, shared by both clients: each one builds a :class:`Call` and hands
    it to ``_send`` (a plain call in :class:`Client`, a coroutine in :class:`AsyncClient`)."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float | httpx.Timeout | None = 120.0,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_retry_delay_s: float = 30.0,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        if retries < 0 or backoff_s < 0 or max_retry_delay_s < 0:
            raise ValueError("retries and delays must not be negative")
        self.base_url = base_url
        self.retries, self.backoff_s, self.max_retry_delay_s = (
            retries, backoff_s, max_retry_delay_s)
        self._http = self._http_class(transport=transport,
                                      **self._http_options(base_url, timeout, headers, api_key))

    def _send(self, call: Call) -> Any:
        raise NotImplementedError

    def _backoff(self, attempt: int, at_least: float = 0.0) -> float:
        return min(max(at_least, self.backoff_s * 2**attempt), self.max_retry_delay_s)

    def _retry_delay(self, call: Call, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying ``response`` (attempt 0 is the first), or None."""
        if attempt >= self.retries:
            return None
        retry_after = _retry_after(response)
        if response.status_code == 429:  # refused before the request was read: always safe
            return self._backoff(attempt, retry_after or 0.0)
        if response.status_code != 503 or not call.retry or retry_after is None:
            return None
        return self._backoff(attempt, retry_after)

    def _failure_delay(self, call: Call | None, error: httpx.TransportError,
                       attempt: int) -> float | None:
        """Seconds to wait before retrying after a transport ``error``, or None to raise it.
        ``call`` None: a job's event stream, which resumes where it stopped."""
        if attempt >= self.retries:
            return None
        if isinstance(error, NOT_SENT) or (
                isinstance(error, DROPPED) and (call is None or call.retry)):
            return self._backoff(attempt)
        return None

    @staticmethod
    def _http_options(base_url: str, timeout: float | httpx.Timeout | None,
                      headers: dict[str, str] | None, api_key: str | None) -> dict[str, Any]:
        """``api_key``: sent as ``Authorization: Bearer``; None: ``$ATELIER3D_API_KEY`` if set,
        "" for none at all."""
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or ""
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return {"base_url": base_url.rstrip("/"), "timeout": timeout,
                "headers": {"User-Agent": USER_AGENT, **auth, **(headers or {})}}

    # sessions

    create_session = _endpoint(
        create_session_call,
        "Uploads an image (path, bytes, PIL image or array); ``wait`` until it is encoded.")
    get_session = _endpoint(get_session_call)
    delete_session = _endpoint(delete_session_call)

    # segmentation

    segment = _endpoint(
        segment_call,
        """Masks for point (``[[x, y], ...]``, labels 1 = foreground by default) and/or box
        (``[x0, y0, x1, y1]``) prompts; ``object_id`` records the result in that object.""")
    cutout = _endpoint(
        cutout_call, "PNG bytes of the masked pixels (``rle``, or ``object_id``'s selected mask).")

    # objects and their history

    create_object = _endpoint(create_object_call)
    get_object = _endpoint(get_object_call)
    select = _endpoint(select_call)

    def undo(self, session_id: str, object_id: str) -> ObjectState:
        return self._send(edit_object_call(session_id, object_id, "undo"))

    def redo(self, session_id: str, object_id: str) -> ObjectState:
        return self._send(edit_object_call(session_id, object_id, "redo"))

    def reset(self, session_id: str, object_id: str) -> ObjectState:
        return self._send(edit_object_call(session_id, object_id, "reset"))

    delete_object = _endpoint(delete_object_call)

    # body and garment separation

    parse = _endpoint(
        parse_call,
        """Body labels, keypoints, garment cut-outs and checks of the character whose mask is
        ``object_id``'s selected one or ``rle``; images are fetched with :meth:`parse_asset`.""")
    get_parse = _endpoint(get_parse_call)
    parse_asset = _endpoint(
        parse_asset_call, "The bytes (PNG, or the ZIP) behind a URL of a :class:`ParseResponse`.")

    # jobs: edits and meshes

    submit_edit = _endpoint(
        submit_edit_call,
        """Queues a text edit of a session's image (``source``: an :class:`ImageSource`, e.g.
        ``{"kind": "object", "object_id": ...}``); follow it with :meth:`wait_job`.""")
    submit_mesh = _endpoint(
        submit_mesh_call,
        "Queues a 3D asset of a session's source or ``parts``, or of an RGBA ``image``.")
    submit_character = _endpoint(
        submit_character_call,
        """Queues Character to 3D: parse, garment completion, optional T-pose, checks and a
        layered GLB as one job; ``resume_from`` a stage reuses ``previous_job_id``'s results.""")
    get_job = _endpoint(get_job_call)
    cancel_job = _endpoint(cancel_job_call)
    job_result = _endpoint(
        job_result_call,
        "The result's bytes (PNG; GLB or ``format`` obj/ply/stl) or an ``artifact``'s.")

    # recipes

    export_recipe = _endpoint(
        export_recipe_call, "The session's clicks, parses, edits, meshes and models as a recipe.")
    replay = _endpoint(replay_call)

    # health

    ready = _endpoint(ready_call)
    health = _endpoint(health_call)

    mask_to_array = staticmethod(mask_to_array)


class Client(_Endpoints):
    """Synchronous client. ``timeout`` is httpx's (seconds, or an ``httpx.Timeout``);
    ``api_key`` is the server's (``auth.api_keys``), by default ``$ATELIER3D_API_KEY``."""

    _http_class = httpx.Client

    def _send(self, call: Call) -> Any:
        for attempt in itertools.count():
            try:
                response = self._http.request(call.method, call.url, **call.kwargs)
            except httpx.TransportError as error:
                if (delay := self._failure_delay(call, error, attempt)) is None:
                    raise
            else:
                if (delay := self._retry_delay(call, response, attempt)) is None:
                    return call.parse(response)
            time.sleep(delay)

    def job_events(self, job_id: str, after: int = -1):
        """The job's progress events (dicts) as they happen, until its last one; a dropped
        stream is reopened after the last event seen (``retries`` times in a row at most)."""
        failures = 0
        while True:
            try:
                with self._http.stream("GET", _job_url(job_id, "events"),
                                       params={"after": after},
                                       timeout=httpx.Timeout(None, connect=30)) as response:
                    if not response.is_success:
                        response.read()
                        raise _error_of(response)
                    for line in response.iter_lines():
                        if (event := _event_of(line)) is not None:
                            after, failures = event["seq"], 0
                            yield event
                            if event["type"] in JOB_ENDS:
                                return
                raise httpx.RemoteProtocolError("the event stream closed before the job ended")
            except httpx.TransportError as error:
                if (delay := self._failure_delay(None, error, failures)) is None:
                    raise
                failures += 1
                time.sleep(delay)

    def wait_job(self, job_id: str, progress: Callable[[dict], None] | None = None) -> JobState:
        """Follows the job to its end (``progress`` sees each event, e.g. a
        :class:`ProgressBar`); raises :class:`ApiError` if it failed or was cancelled."""
        for event in self.job_events(job_id):
            if _followed(event, job_id, progress):
                break
        return self.get_job(job_id)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Endpoints):
    """Asynchronous client: the same methods as :class:`Client`, each returning an awaitable."""

    _http_class = httpx.AsyncClient

    async def _send(self, call: Call) -> Any:
        for attempt in itertools.count():
            try:
                response = await self._http.request(call.method, call.url, **call.kwargs)
            except httpx.TransportError as error:
                if (delay := self._failure_delay(call, error, attempt)) is None:
                    raise
            else:
                if (delay := self._retry_delay(call, response, attempt)) is None:
                    return call.parse(response)
            await asyncio.sleep(delay)

    async def job_events(self, job_id: str, after: int = -1):
        """The job's progress events; see :meth:`Client.job_events`."""
        failures = 0
        while True:
            try:
                async with self._http.stream("GET", _job_url(job_id, "events"),
                                             params={"after": after},
                                             timeout=httpx.Timeout(None, connect=30)) as response:
                    if not response.is_success:
                        await response.aread()
                        raise _error_of(response)
                    async for line in response.aiter_lines():
                        if (event := _event_of(line)) is not None:
                            after, failures = event["seq"], 0
                            yield event
                            if event["type"] in JOB_ENDS:
                                return
                raise httpx.RemoteProtocolError("the event stream closed before the job ended")
            except httpx.TransportError as error:
                if (delay := self._failure_delay(None, error, failures)) is None:
                    raise
                failures += 1
                await asyncio.sleep(delay)

    async def wait_job(self, job_id: str,
                       progress: Callable[[dict], None] | None = None) -> JobState:
        """Follows the job to its end; see :meth:`Client.wait_job`."""
        async for event in self.job_events(job_id):
            if _followed(event, job_id, progress):
                break
        return await self.get_job(job_id)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


__all__ = [
    "ApiError",
    "AsyncClient",
    "ProgressBar",
    "Call",
    "Client",
    "as_rle",
    "create_object_call",
    "cancel_job_call",
    "create_session_call",
    "cutout_call",
    "delete_object_call",
    "delete_session_call",
    "edit_object_call",
    "get_object_call",
    "get_job_call",
    "get_parse_call",
    "get_session_call",
    "health_call",
    "image_bytes",
    "job_result_call",
    "mask_to_array",
    "parse_asset_call",
    "parse_call",
    "ready_call",
    "segment_call",
    "submit_edit_call",
    "submit_mesh_call",
    "select_call",
]
