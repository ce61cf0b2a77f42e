"""Serialised records of what a session holds, for a store shared by Gateway replicas (Redis).

A record is JSON for the structure and raw numpy arrays for the pixels and logits, in one ``.npz``
container read back with ``allow_pickle=False``: nothing read from the store can run code here.
Steps (a click's candidates and low-resolution logits) and parses are immutable once made, so
each is one record of its own, written once and cached by every replica that reads it; the
session's own record is small (which step of which object is current, which is selected) and is
what each change rewrites.
"""

from __future__ import annotations

import io
import json

import numpy as np

from atelier3d.api.parse import Check, ParseRequest, ParseResponse, Pose
from atelier3d.api.segment import MaskCandidate
from atelier3d.serve.sessions.session import Step, StoredParse
from atelier3d.stages.parse import ParseResult, Part

META = "__meta__"


def pack(meta: dict, arrays: dict[str, np.ndarray] | None = None, compress: bool = False) -> bytes:
    """``meta`` (JSON-able) and named arrays as one ``.npz`` blob. Compress pixels (they shrink
    a lot), not logits (float noise, and a click should not wait for zlib)."""
    buffer = io.BytesIO()
    payload = {META: np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)}
    payload.update({f"a/{name}": np.ascontiguousarray(a) for name, a in (arrays or {}).items()})
    (np.savez_compressed if compress else np.savez)(buffer, **payload)
    return buffer.getvalue()


def unpack(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        meta = json.loads(archive[META].tobytes())
        arrays = {name[2:]: archive[name] for name in archive.files if name.startswith("a/")}
    return meta, arrays


# ---- steps -----------------------------------------------------------------------------------

def shared_logits(low_res: np.ndarray | None) -> np.ndarray | None:
    """The logits as every replica sees them: float16 (half the bytes; masks agree 99.996%)."""
    return None if low_res is None else np.asarray(low_res, np.float16)


def pack_step(step: Step) -> bytes:
    meta = {
        "points": [list(p) for p in step.points],
        "labels": list(step.labels),
        "box": list(step.box) if step.box is not None else None,
        "candidates": [c.model_dump(mode="json") for c in step.candidates],
        "selected": step.selected,
        "refine": step.refine,
        "mask_input": step.mask_input,
        "multimask": step.multimask,
    }
    arrays = {"low_res": shared_logits(step.low_res)} if step.low_res is not None else {}
    return pack(meta, arrays)


def unpack_step(blob: bytes, uid: str) -> Step:
    meta, arrays = unpack(blob)
    return Step(
        points=[tuple(p) for p in meta["points"]],
        labels=list(meta["labels"]),
        box=tuple(meta["box"]) if meta["box"] is not None else None,
        candidates=[MaskCandidate.model_validate(c) for c in meta["candidates"]],
        low_res=arrays.get("low_res"),
        selected=int(meta["selected"]),
        uid=uid,
        refine=bool(meta.get("refine", False)),
        mask_input=meta.get("mask_input"),
        multimask=bool(meta.get("multimask", True)),
    )


# ---- parses ----------------------------------------------------------------------------------

def pack_parse(stored: StoredParse) -> bytes:
    """A ``StoredParse`` (its response and result; rendered images are re-made where needed)."""
    result = stored.result
    arrays = {"label_map": result.label_map}
    parts = []
    for i, part in enumerate(result.parts):
        arrays[f"part{i}"] = part.rgba
        if part.name in result.completed:
            arrays[f"completed{i}"] = result.completed[part.name]
        parts.append({"name": part.name, "labels": list(part.labels), "box": list(part.box)})
    meta = {
        "response": stored.response.model_dump(mode="json"),
        "size": list(result.size),
        "box": list(result.box),
        "labels": list(result.labels),
        "rles": result.rles,
        "pose": result.pose.model_dump(mode="json") if result.pose is not None else None,
        "checks": [c.model_dump(mode="json") for c in result.checks],
        "parts": parts,
        "timings_ms": result.timings_ms,
        "mask": stored.mask,
        "request": stored.request.model_dump(mode="json") if stored.request else None,
    }
    return pack(meta, arrays, compress=True)


def unpack_parse(blob: bytes) -> StoredParse:
    meta, arrays = unpack(blob)
    parts, completed = [], {}
    for i, part in enumerate(meta["parts"]):
        parts.append(Part(name=part["name"], labels=tuple(part["labels"]),
                          box=tuple(part["box"]), rgba=arrays[f"part{i}"]))
        if f"completed{i}" in arrays:
            completed[part["name"]] = arrays[f"completed{i}"]
    result = ParseResult(
        size=tuple(meta["size"]),
        box=tuple(meta["box"]),
        label_map=arrays["label_map"],
        labels=meta["labels"],
        rles=meta["rles"],
        pose=Pose.model_validate(meta["pose"]) if meta["pose"] is not None else None,
        checks=[Check.model_validate(c) for c in meta["checks"]],
        parts=parts,
        completed=completed,
        timings_ms=meta["timings_ms"],
    )
    request = meta.get("request")
    return StoredParse(ParseResponse.model_validate(meta["response"]), result,
                       mask=meta.get("mask"),
                       request=ParseRequest.model_validate(request) if request else None)
