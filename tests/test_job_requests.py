"""A queued job's request as Redis keeps it: rebuilt as it was, and never code."""

from __future__ import annotations

import numpy as np
import pytest

from atelier3d.api.character import CharacterJobRequest, CharacterResults
from atelier3d.serve.character.service import CharacterPlan
from atelier3d.serve.jobs.requests import decode_request, encode_request
from atelier3d.serve.sessions.records import pack
from atelier3d.stages.edit import EditRequest
from atelier3d.stages.mesh import MeshRequest


def test_edit_and_layered_mesh_requests_come_back_as_built():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)  # composited on white when built
    mask = rng.random((48, 64)) > 0.5
    edit = EditRequest.build(images=[image], mask=mask, preset="free", prompt="a red coat",
                             seed=7, steps=3)
    back = decode_request(encode_request(edit))
    assert type(back) is EditRequest and back.model_dump(exclude={"images", "mask"}) \
        == edit.model_dump(exclude={"images", "mask"})
    assert all(np.array_equal(a, b) and a.dtype == b.dtype
               for a, b in zip(back.images, edit.images, strict=True))
    assert np.array_equal(back.mask, edit.mask) and back.mask.dtype == bool

    rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[8:40, 8:56, 3] = 255
    mesh = MeshRequest.build(parts=[("body", rgba), ("coat", rgba)], seed=3, steps=2)
    back = decode_request(encode_request(mesh))
    assert [name for name, _ in back.parts] == ["body", "coat"]
    assert isinstance(back.parts[0], tuple) and np.array_equal(back.parts[1][1], rgba)
    assert back.seed == 3 and back.steps == 2 and back.image is None


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "subprocess:Popen",
                                  "atelier3d.serve.jobs.requests:decode_request"])
def test_a_stored_request_naming_anything_else_is_refused(name):
    blob = pack({"request": {"$type": name, "fields": {"args": "true"}}})
    with pytest.raises(ValueError, match="not a request type"):
        decode_request(blob)


def test_a_character_plan_comes_back_with_its_nested_models():
    plan = CharacterPlan("ses_1", "client-a",
                         CharacterJobRequest(object_id="obj_1", garments=["upper-clothes"],
                                             t_pose=True),
                         CharacterResults(parse_id="prs_1", completed={"upper-clothes": None}))
    back = decode_request(encode_request(plan))
    assert back == plan
