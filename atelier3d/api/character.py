"""Character to 3D: one job from a segmented character to a layered 3D asset.

Its stages, in order: ``parse`` the character, ``complete`` what hides the chosen garments
(an edit per garment, preset ``complete_occluded`` on its parse part), optionally ``t_pose``
(an edit to a front T-pose full body), ``checks`` (the pre-3D checks of the parse of the image
that goes to 3D), ``mesh`` (a layered asset: body, each garment and hair as named nodes). Each
stage's result is an ordinary parse, edit or mesh of the session, named in the job's events
and result; a later job can start from any stage and reuse them (``resume_from``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atelier3d.api.common import ApiModel, FiniteFloat
from atelier3d.api.mesh import MeshOptions

CharacterStage = Literal["parse", "complete", "t_pose", "checks", "mesh"]

CHARACTER_STAGES: tuple[CharacterStage, ...] = ("parse", "complete", "t_pose", "checks", "mesh")


class CharacterResults(ApiModel):
    """What the stages made, by id: each opens with the ordinary parse, edit and mesh routes."""

    parse_id: str | None = Field(None, description="the character's parse (stage parse)")
    completed: dict[str, str | None] = Field(
        default_factory=dict, description="garment -> its complete_occluded edit job "
        "(null where nothing hides it: the parse part is used as it is)")
    t_pose_job_id: str | None = Field(None, description="the T-pose edit (stage t_pose)")
    checks_parse_id: str | None = Field(
        None, description="the parse whose parts and checks go to 3D (stage checks): the "
        "T-pose edit's, or the character's when there is no T-pose")
    mesh_job_id: str | None = Field(None, description="the layered mesh job (stage mesh)")


class CharacterEditOptions(ApiModel):
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = Field(None, description="default: the server's")
    true_cfg_scale: FiniteFloat | None = None
    width: int | None = Field(None, description="the T-pose edit's size; default: the "
                              "pipeline's")
    height: int | None = None


CharacterMeshOptions = MeshOptions  # the mesh stage takes a mesh job's parameters


class CharacterJobRequest(ApiModel):
    object_id: str = Field(min_length=1, description="the segmented character (its selected "
                           "mask)")
    garments: list[str] = Field(
        default_factory=list, max_length=11,
        description="ATR garment labels to complete where something hides them and to build "
        "as their own nodes (e.g. Upper-clothes, Pants)")
    t_pose: bool = Field(False, description="edit to a front T-pose full body before 3D")
    hair: bool = Field(True, description="a hair node when the parse finds hair")
    edit: CharacterEditOptions = Field(default_factory=CharacterEditOptions)
    mesh: CharacterMeshOptions = Field(default_factory=CharacterMeshOptions)
    resume_from: CharacterStage = Field(
        "parse", description="the first stage to run; the earlier stages' results are reused "
        "(from previous_job_id, overridden by reuse)")
    previous_job_id: str | None = Field(
        None, description="a character job of this session whose results are reused")
    reuse: CharacterResults | None = Field(
        None, description="results to reuse instead of (or besides) the previous job's, "
        "e.g. an edit of a garment made by hand since")
