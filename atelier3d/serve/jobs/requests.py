"""A queued job's deployment request as Redis keeps it, for a replica that takes the job over.

JSON for the structure and raw numpy arrays for the pixels (the sessions' ``.npz`` records, read
with ``allow_pickle=False``), so nothing read back from Redis can run code: a type is named by
module and class and rebuilt only where it is a pydantic model or a dataclass of atelier3d
already loaded in this process. A pydantic request comes back as built, without validating it
again (its validators ran when it was submitted, and some of them normalise what they check).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
from pydantic import BaseModel

from atelier3d.serve.sessions.records import pack, unpack

ARRAY, TUPLE, DICT, TYPE = "$array", "$tuple", "$dict", "$type"


def encode_request(request: Any) -> bytes:
    arrays: dict[str, np.ndarray] = {}

    def encode(value: Any) -> Any:
        if value is None or isinstance(value, str | bool | int | float):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            name = str(len(arrays))
            arrays[name] = value
            return {ARRAY: name}
        if isinstance(value, tuple):
            return {TUPLE: [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            return {DICT: [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, BaseModel):
            names = type(value).model_fields
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            names = [f.name for f in dataclasses.fields(value)]
        else:
            raise TypeError(f"a job request cannot hold a {type(value).__name__}")
        kind = type(value)
        return {TYPE: f"{kind.__module__}:{kind.__qualname__}",
                "fields": {name: encode(getattr(value, name)) for name in names}}

    return pack({"request": encode(request)}, arrays)


def decode_request(blob: bytes) -> Any:
    meta, arrays = unpack(blob)

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if ARRAY in value:
            return arrays[value[ARRAY]]
        if TUPLE in value:
            return tuple(decode(v) for v in value[TUPLE])
        if DICT in value:
            return {decode(k): decode(v) for k, v in value[DICT]}
        kind = _known_type(value[TYPE])
        fields = {name: decode(v) for name, v in value["fields"].items()}
        return kind.model_construct(**fields) if issubclass(kind, BaseModel) else kind(**fields)

    return decode(meta["request"])


def _known_type(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name) if module_name.startswith("atelier3d.") else None
    kind: Any = module
    for part in qualname.split(".") if module is not None else ():
        kind = getattr(kind, part, None)
    if not isinstance(kind, type) or not (issubclass(kind, BaseModel)
                                          or dataclasses.is_dataclass(kind)):
        raise ValueError(f"a stored job request names {name!r}, not a request type")
    return kind
