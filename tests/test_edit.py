"""Qwen-Image-Edit's model side: the tiny pipeline, EditRequest validation, the ImageEditor
deployment's class in-process (streamed progress, cancel, quantization) against diffusers called
directly."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from atelier3d import rle
from atelier3d.config import EditSettings
from atelier3d.errors import BadRequest, Unprocessable
from atelier3d.stages.edit import PRESETS, EditRequest
from tests.helpers import GENERATED

STEPS = 2
SIZE = 64
PROMPT = "make the shirt red"
# Multi-image edits need a model trained for them; in tiny mode, its tiny stand-in.
PLUS_MODEL = "Qwen/Qwen-Image-Edit-2509"


@pytest.fixture(scope="module")
def tiny_edit():
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir

    return tiny_edit_dir(GENERATED)


def editor_config(**edit) -> dict:
    return {"models": "tiny", "cache_dir": str(GENERATED), "edit": {"min_side": 32, **edit}}


def make_editor(**edit):
    from atelier3d.deployments.edit import ImageEditor

    editor = ImageEditor.func_or_class(editor_config(**edit))
    # The deployment defaults to one thread; the tests use the box's cores.
    editor.reconfigure({"torch_threads": os.cpu_count() or 1})
    return editor


@pytest.fixture(scope="module")
def editor(tiny_edit):
    return make_editor(quantization="none", text_encoder_quantization="none",
                       plus_model=PLUS_MODEL)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)


def request(image: np.ndarray, **fields) -> EditRequest:
    fields = dict(images=[image], prompt=PROMPT, steps=STEPS, seed=3, width=SIZE, height=SIZE,
                  ) | fields
    return EditRequest.build(EditSettings(min_side=32, plus_model=PLUS_MODEL), **fields)


async def events_of(editor, req: EditRequest) -> list[dict]:
    return [event async for event in editor.edit(req)]


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def direct_edit(pipe, image: np.ndarray) -> np.ndarray:
    """The same edit as :func:`request`'s, with diffusers alone."""
    out = pipe(image=Image.fromarray(image), prompt=PROMPT, negative_prompt=" ",
               true_cfg_scale=4.0, num_inference_steps=STEPS, width=SIZE, height=SIZE,
               generator=torch.Generator("cpu").manual_seed(3))
    return np.asarray(out.images[0])


def test_tiny_pipeline_round_trips_offline(tiny_edit):
    """A fresh process with HF_HUB_OFFLINE=1 resolves the class and the tokenizer's ids."""
    code = (
        "import sys; from diffusers import DiffusionPipeline\n"
        "p = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "c, t = p.text_encoder.config, p.tokenizer\n"
        "assert c.image_token_id == t.convert_tokens_to_ids('<|image_pad|>')\n"
        "assert c.vision_start_token_id == t.convert_tokens_to_ids('<|vision_start|>')\n"
        "assert c.text_config.vocab_size == len(t) and c.atelier3d_random_init\n"
        "assert p.processor.image_token_id == c.image_token_id\n"
        "print(type(p).__name__)\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(tiny_edit)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "QwenImageEditPipeline"


async def test_editor_streams_steps_then_a_png_identical_to_diffusers(editor, tiny_edit, image):
    from diffusers import DiffusionPipeline

    events = await events_of(editor, request(image))
    progress = [(e["stage"], e["step"], e["total"]) for e in events[:-1]]
    assert all(e["type"] == "progress" for e in events[:-1])
    assert progress == [("encode", 0, 1), ("encode", 1, 1),
                        *[("denoise", i, STEPS) for i in range(1, STEPS + 1)],
                        ("decode", 0, 1), ("decode", 1, 1)]
    result = events[-1]
    assert result["type"] == "result" and result["media_type"] == "image/png"
    meta = result["meta"]
    assert meta | {"timings_ms": None} == {
        "seed": 3, "steps": STEPS, "true_cfg_scale": 4.0, "width": SIZE, "height": SIZE,
        "pipeline": "edit", "preset": "free", "model": "qwen-edit-random", "cache": None,
        "mask": None, "timings_ms": None}
    assert set(meta["timings_ms"]) == {"encode_ms", "denoise_ms", "decode_ms", "total_ms"}

    direct = direct_edit(DiffusionPipeline.from_pretrained(tiny_edit), image)
    np.testing.assert_array_equal(decode(result["data"]), direct)
    assert editor.info().weights == "untrained"
    assert editor.info().model_type == "qwen-edit-random+none/none"


async def test_torchao_int8_editor_equals_a_torchao_quantized_pipeline(tiny_edit, image):
    from diffusers import DiffusionPipeline
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    editor = make_editor(quantization="torchao_int8wo",
                         text_encoder_quantization="torchao_int8wo")
    weight = editor.pipes.edit.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert editor.pipes.quantization == {"transformer": "torchao_int8wo",
                                         "text_encoder": "torchao_int8wo"}
    events = await events_of(editor, request(image))

    pipe = DiffusionPipeline.from_pretrained(tiny_edit)
    quantize_(pipe.transformer, Int8WeightOnlyConfig())
    quantize_(pipe.text_encoder, Int8WeightOnlyConfig())
    np.testing.assert_array_equal(decode(events[-1]["data"]), direct_edit(pipe, image))


async def test_cancel_stops_the_run_and_frees_the_editor(editor, image):
    forwards = []
    hook = editor.pipes.edit.transformer.register_forward_hook(lambda *_: forwards.append(1))
    try:
        stream = editor.edit(request(image))
        first = await anext(stream)
        assert first == {"type": "progress", "stage": "encode", "step": 0, "total": 1}
        await stream.aclose()  # what a cancelled Serve request does to the stream
        # The worker stops at its next report (the end of encoding) and releases the lock.
        assert editor._lock.acquire(timeout=30)
        editor._lock.release()
    finally:
        hook.remove()
    assert forwards == []  # not one denoising step ran
    events = await events_of(editor, request(image, seed=4))
    assert events[-1]["type"] == "result"


async def test_masked_edit_runs_the_inpaint_pipeline(editor, image):
    mask = np.zeros(image.shape[:2], bool)
    mask[40:80, 10:50] = True
    rgba = np.dstack([image, np.where(mask, 0, 255).astype(np.uint8)])  # hidden part cut away
    req = request(rgba, mask=mask, preset="complete_occluded", prompt="", steps=1, width=None,
                  height=None)
    assert (req.images[0][mask] == 255).all()  # composited on white
    events = await events_of(editor, req)
    assert [e["step"] for e in events if e.get("stage") == "denoise"] == [1]
    meta = events[-1]["meta"]
    assert meta["pipeline"] == "inpaint" and meta["preset"] == "complete_occluded"
    np.testing.assert_array_equal(rle.decode(meta["mask"], mask.shape), mask)  # as it ran
    # The inpaint pipeline keeps the image's aspect ratio at ~1 MP.
    assert abs(meta["width"] / meta["height"] - 64 / 96) < 0.05
    assert decode(events[-1]["data"]).shape == (meta["height"], meta["width"], 3)


async def test_several_images_run_the_plus_pipeline(editor, image):
    events = await events_of(editor, request(image, images=[image, image[:, ::-1]], steps=1))
    assert events[-1]["meta"]["pipeline"] == "plus"
    assert decode(events[-1]["data"]).shape == (SIZE, SIZE, 3)


def test_presets_compose_prompts(image):
    req = request(image, preset="t_pose", prompt="keep the hat")
    assert req.full_prompt == f"{PRESETS['t_pose'].prompt} keep the hat"
    assert req.full_negative_prompt == PRESETS["t_pose"].negative_prompt
    assert request(image, negative_prompt="blurry").full_negative_prompt == "blurry"
    assert request(image).pipeline() == "edit" and request(image).pipeline(True) == "plus"


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        (dict(prompt="  "), BadRequest, "needs a prompt"),
        (dict(preset="cartoonify"), BadRequest, "unknown preset"),
        (dict(width=100, height=96), Unprocessable, "multiple of 16"),
        (dict(width=64, height=None), BadRequest, "both width and height"),
        (dict(width=4096, height=64), Unprocessable, "outside 32..2048"),
        (dict(steps=0), Unprocessable, "at least 1"),
        (dict(steps=101), Unprocessable, "steps 101 > 100"),
        (dict(true_cfg_scale=0.5), Unprocessable, "true_cfg_scale"),
        (dict(mask=np.ones((10, 10), bool), width=None, height=None), BadRequest,
         "the mask is (10, 10)"),
        (dict(mask=np.zeros((96, 64), bool), width=None, height=None), BadRequest,
         "mask is empty"),
        (dict(mask=np.ones((96, 64), bool)), Unprocessable, "leave width and height unset"),
        (dict(preset="complete_occluded"), BadRequest, "needs a mask"),
        (dict(images=[]), BadRequest, "no image"),
        (dict(images=[np.zeros((96, 64), np.uint8)]), BadRequest, "(H, W, 3|4) uint8"),
        (dict(images=[np.zeros((8, 64, 3), np.uint8)]), Unprocessable, "aspect ratio"),
        (dict(seed=-1), BadRequest, "invalid edit request"),
    ],
)
def test_bad_requests_are_4xx(image, fields, error, words):
    with pytest.raises(error) as caught:
        request(image, **fields)
    assert words in caught.value.message


async def test_the_editor_applies_its_own_limits(tiny_edit, image):
    editor = make_editor(max_steps=20, quantization="none", text_encoder_quantization="none")
    with pytest.raises(Unprocessable, match="steps 30 > 20"):
        await events_of(editor, request(image, steps=30))  # built against the default limits


def test_missing_weights_fail_in_real_mode_and_fall_back_loudly_in_auto(tiny_edit, caplog):
    from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline

    settings = EditSettings(model="/no/such/qwen-image-edit")
    with pytest.raises((OSError, ValueError)):
        load_edit_pipeline(settings, "real", GENERATED)
    pipes = load_edit_pipeline(settings, "auto", GENERATED)
    assert not pipes.trained and "FALLING BACK TO TINY" in caplog.text


def test_lightning_lora_brings_its_schedule_and_defaults(tiny_edit):
    from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline

    settings = EditSettings(lightning_lora={"steps": 4}, plus_model=PLUS_MODEL)
    pipes = load_edit_pipeline(settings, "tiny", GENERATED)  # the hub LoRA's tiny stand-in
    # A local folder is named, not its path on the server (/readyz shows these).
    assert pipes.lora == ("qwen-image-lightning-tiny-random/"
                          "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors")
    assert pipes.plus_lora == ("qwen-image-lightning-tiny-random/Qwen-Image-Edit-2509/"
                               "Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors")
    schedule = pipes.edit.scheduler.config
    assert schedule.base_shift == schedule.max_shift == pytest.approx(math.log(3))
    assert schedule.shift_terminal is None and schedule.use_dynamic_shifting
    assert pipes.inpaint.scheduler is pipes.plus.scheduler is pipes.edit.scheduler
    assert (pipes.settings.default_steps, pipes.settings.default_true_cfg_scale) == (4, 1.0)


def test_multi_image_edits_need_a_model_trained_for_them(tiny_edit, image):
    from atelier3d.models.edit.qwen_image_edit import load_edit_pipeline

    plain = EditSettings(min_side=32)
    with pytest.raises(Unprocessable, match="extra_sources") as refused:
        EditRequest.build(plain, images=[image, image], prompt=PROMPT)
    assert "edit.plus_model" in refused.value.message
    pipes = load_edit_pipeline(plain, "tiny", GENERATED)
    assert pipes.plus is None and pipes.plus_source is None
    # A release trained for several images runs them itself, with no second transformer.
    assert EditSettings(model="Qwen/Qwen-Image-Edit-2509").multi_image_model.endswith("2509")
    pipes = load_edit_pipeline(EditSettings(plus_model=PLUS_MODEL), "tiny", GENERATED)
    assert pipes.plus.transformer is not pipes.edit.transformer
    assert pipes.plus.text_encoder is pipes.edit.text_encoder and pipes.plus.vae is pipes.edit.vae
    with pytest.raises(ValueError, match="not trained for it"):
        EditSettings(plus=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only start-up error")
@pytest.mark.parametrize("field", ["quantization", "text_encoder_quantization"])
def test_bitsandbytes_on_cpu_fails_at_start_up_with_the_way_out(field):
    from atelier3d.deployments.edit import ImageEditor

    with pytest.raises(ValueError, match="use torchao_int8wo or none on CPU"):
        ImageEditor.func_or_class(editor_config(**{field: "bitsandbytes_4bit"}))
