"""``edit.cache``: diffusers' step caches on the tiny Qwen-Image-Edit pipeline, against the same
edit uncached (same seed), counting the transformer blocks that really ran."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import ValidationError

from atelier3d.config import EditSettings
from atelier3d.stages.edit import EditRequest
from tests.helpers import GENERATED

STEPS = 6
SIZE = 64


class Silent:
    def report(self, stage: str, step: int, total: int) -> None:
        pass


@pytest.fixture(scope="module")
def pipes():
    from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline

    settings = EditSettings(min_side=32, quantization="none", text_encoder_quantization="none")
    return load_edit_pipeline(settings, "tiny", GENERATED)


@pytest.fixture(scope="module")
def edit_request() -> EditRequest:
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return EditRequest.build(EditSettings(min_side=32), images=[image], prompt="red shirt",
                             steps=STEPS, seed=5, width=SIZE, height=SIZE)


def run(pipes, request: EditRequest, cache: dict | None) -> tuple[np.ndarray, int, dict]:
    """The edit's pixels, how many times the last transformer block really ran (its attention's
    query projection: the cache hooks replace the forward of a block or of its attention, so a
    hook on those fires anyway), and the result meta."""
    from atelier3d.imaging import decode_image
    from atelier3d.models.edit.qwen_image_edit import run_edit

    settings = pipes.settings.model_copy(update={"cache": cache})
    configured = dataclasses.replace(pipes, settings=EditSettings.model_validate(
        settings.model_dump()))
    calls = 0

    def count(module, args):
        nonlocal calls
        calls += 1

    hook = pipes.edit.transformer.transformer_blocks[-1].attn.to_q.register_forward_pre_hook(count)
    try:
        result = run_edit(configured, request, Silent())
    finally:
        hook.remove()
    return decode_image(result["data"], 1 << 20), calls, result["meta"]


def test_caches_skip_blocks_and_leave_no_hooks_behind(pipes, edit_request):
    plain, plain_calls, meta = run(pipes, edit_request, None)
    assert meta["cache"] is None
    # True CFG: a conditional and an unconditional forward per step.
    assert plain_calls == 2 * STEPS

    # A zero threshold never reuses: the same pixels as uncached, through the hooks.
    same, same_calls, meta = run(pipes, edit_request, {"kind": "first_block", "threshold": 0.0})
    assert meta["cache"] == "first_block" and same_calls == plain_calls
    np.testing.assert_array_equal(same, plain)

    skipping = {
        "first_block": {"kind": "first_block", "threshold": 1.0},
        "taylorseer": {"kind": "taylorseer", "cache_interval": 3, "disable_cache_before_step": 1},
        "mag": {"kind": "mag", "mag_ratios": [1.0] * STEPS, "threshold": 1.0,
                "retention_ratio": 0.0, "max_skip_steps": 2},
    }
    for kind, cache in skipping.items():
        cached, calls, meta = run(pipes, edit_request, cache)
        assert meta["cache"] == kind
        assert calls < plain_calls, kind
        assert cached.shape == plain.shape and cached.dtype == np.uint8

    # The hooks went with each edit: uncached again gives the first pixels and every block.
    again, again_calls, _ = run(pipes, edit_request, None)
    assert again_calls == plain_calls
    np.testing.assert_array_equal(again, plain)


@pytest.mark.parametrize("cache, words", [
    ({"kind": "mag"}, "mag_ratios"),
    ({"kind": "first_block", "threshold": -1}, "threshold"),
    ({"kind": "teacache"}, "kind"),
])
def test_bad_cache_settings_are_refused_at_load(cache, words):
    with pytest.raises(ValidationError, match=words):
        EditSettings(cache=cache)
