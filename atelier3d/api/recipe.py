"""Recipes: a session as JSON (its clicks, parses, edits, meshes and the exact models), and
what replaying one on the same image answers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from atelier3d.api.common import RLE, ApiModel, FiniteFloat, Point
from atelier3d.api.edit import EditJobRequest
from atelier3d.api.mesh import MeshJobRequest
from atelier3d.api.parse import PartGroup

RECIPE_SCHEMA_VERSION = 1


class RecipeModel(ApiModel):
    """One model as ``/readyz`` reports it, and where the server loads it from."""

    source: str = Field(description="hub id (with the subfolder) or local path, as configured")
    model_type: str = Field(description="architecture, quantization and LoRA, as /readyz says")
    checkpoint_sha256: str = Field(description="digest of the weights the replica loaded")
    weights: Literal["trained", "untrained"]


class RecipeStep(ApiModel):
    """One click (or box) of an object's history, in effect when the recipe was made."""

    points: list[Point] = Field(default_factory=list)
    labels: list[Literal[0, 1]] = Field(default_factory=list)
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat] | None = None
    refine: bool = Field(False, description="refined the previous step's selected mask")
    mask_input: RLE | None = None
    multimask: bool = True
    selected: int = Field(ge=0, description="the chosen candidate")
    mask: RLE = Field(description="the chosen candidate's mask, to check the replay against")


class RecipeObject(ApiModel):
    object_id: str
    steps: list[RecipeStep]


class RecipeParse(ApiModel):
    parse_id: str
    object_id: str | None = Field(None, description="the object whose mask was parsed")
    mask: RLE = Field(description="the character's mask as it was parsed")
    groups: list[PartGroup] | None = None
    complete_occlusions: bool | None = None


class RecipeEdit(EditJobRequest):
    """An edit job as submitted, with the steps and CFG the server chose filled in; ids in its
    sources are the recipe's."""

    kind: Literal["edit"] = "edit"
    job_id: str
    session_id: str | None = None  # the replay's session
    output_size: tuple[int, int] | None = Field(
        None, description="[width, height] of the result; width and height stay as submitted "
        "(unset: the pipeline's size for the source, which a masked edit must leave unset)")


class RecipeMesh(MeshJobRequest):
    """A mesh job as submitted, every parameter filled in with the server's defaults."""

    kind: Literal["mesh"] = "mesh"
    job_id: str


RecipeJob = Annotated[RecipeEdit | RecipeMesh, Field(discriminator="kind")]


class Recipe(ApiModel):
    schema_version: Literal[1] = RECIPE_SCHEMA_VERSION
    image_sha256: str = Field(description="sha256 of the decoded RGB pixels (height, width, 3; "
                              "uint8, row-major), so a lossless re-encoding still matches")
    width: int
    height: int
    models: dict[str, RecipeModel] = Field(
        description="the models the session's steps ran on, by /readyz name")
    objects: list[RecipeObject] = Field(default_factory=list)
    parses: list[RecipeParse] = Field(default_factory=list)
    jobs: list[RecipeJob] = Field(default_factory=list, description="in submission order")


class ReplayResponse(ApiModel):
    session_id: str
    objects: dict[str, str] = Field(description="the recipe's object ids -> the new ones")
    parses: dict[str, str] = Field(description="the recipe's parse ids -> the new ones")
    jobs: dict[str, str] = Field(description="the recipe's job ids -> the new ones (queued "
                                 "or running: follow them at /v1/jobs/{id}/events)")
    mismatched_masks: list[str] = Field(
        description="objects whose replayed mask differs from the recipe's (empty when the "
        "replay reproduced every click)")
