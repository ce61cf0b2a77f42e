"""What every stage's requests and responses share: RLE masks, sources, errors, model info."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RLE(ApiModel):
    """COCO run-length encoding; ``counts`` is the compressed string (or raw run lengths)."""

    size: tuple[int, int] = Field(description="[height, width]")
    counts: str | list[int]


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

Point = tuple[FiniteFloat, FiniteFloat]


class MaskSource(ApiModel):
    """A mask given either as RLE or as an object (its selected candidate): exactly one."""

    rle: RLE | None = None
    object_id: str | None = Field(None, description="use this object's selected mask")

    @model_validator(mode="after")
    def _one_source(self) -> MaskSource:
        if (self.rle is None) == (self.object_id is None):
            raise ValueError("give exactly one of rle or object_id")
        return self


class ErrorBody(ApiModel):
    code: str
    message: str
    retryable: bool | None = Field(
        None, description="a failed job's error: true when the same request may succeed if "
        "submitted again (its replica was lost)")


class ErrorResponse(ApiModel):
    error: ErrorBody


class ImageSource(ApiModel):
    """Where a job's input image comes from, within its session.

    ``original``: the uploaded image. ``object``: an object's cut-out (RGBA, cropped to its mask
    with a margin). ``part``: a garment/part cut-out of a parse (``completed``: its version with
    the occluded part filled in). ``job``: the result of an earlier edit job of the same session.
    ``session``: the image uploaded to another session of the same client (a garment or
    reference photo, for a multi-image edit).
    """

    kind: Literal["original", "object", "part", "job", "session"] = "original"
    object_id: str | None = None
    parse_id: str | None = None
    part: str | None = None
    completed: bool = False
    job_id: str | None = None
    session_id: str | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ImageSource:
        needed = {"original": (), "object": ("object_id",), "part": ("parse_id", "part"),
                  "job": ("job_id",), "session": ("session_id",)}[self.kind]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind!r} source needs {', '.join(missing)}")
        return self


class ModelInfo(ApiModel):
    model_type: str
    weights: Literal["trained", "untrained"]
    checkpoint_sha256: str
    note: str | None = Field(None, description="where the model does less than its config "
                             "could mean, what and why (Shape3D under texture: auto projecting "
                             "colours instead of painting them)")


class ReadyInfo(ApiModel):
    ready: bool
    weights: Literal["trained", "untrained"]
    models: dict[str, ModelInfo]
