"""The Lightning LoRA: tiny files in lightx2v/Qwen-Image-Lightning's layout go through diffusers'
conversion and peft, the ImageEditor's edits equal diffusers' with the LoRA loaded directly, and
a LoRA that cannot be loaded stops the start in every models mode."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from atelier3d.config import EditSettings
from atelier3d.models.edit.lightning import (
    EDIT_2509_FILES,
    EDIT_FILES,
    LIGHTNING_MODULES,
    TINY_ALPHA,
    TINY_RANK,
    LightningLoraError,
    lightning_state_dict,
)
from atelier3d.stages.edit import EditRequest
from tests.helpers import GENERATED, PROMPT, SIZE, direct

PLUS_MODEL = "Qwen/Qwen-Image-Edit-2509"
@pytest.fixture(scope="module")
def tiny():
    from atelier3d.models.edit.qwen_image_edit import tiny_edit_dir, tiny_lightning_dir

    return {"edit": tiny_edit_dir(GENERATED), "plus": tiny_edit_dir(GENERATED, plus=True),
            "lightning": tiny_lightning_dir(GENERATED)}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (80, 64, 3), dtype=np.uint8)


def editor_with(**edit):
    from atelier3d.deployments.edit import ImageEditor

    config = {"models": edit.pop("models", "tiny"), "cache_dir": str(GENERATED),
              "edit": {"min_side": 32, "quantization": "none",
                       "text_encoder_quantization": "none", **edit}}
    return ImageEditor.func_or_class(config)


async def served(editor, images: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    request = EditRequest.build(editor.pipes.settings, images=images, prompt=PROMPT, seed=5,
                                width=SIZE, height=SIZE)
    events = [event async for event in editor.edit(request)]
    result = events[-1]
    return np.asarray(Image.open(io.BytesIO(result["data"]))), result["meta"]


def test_tiny_files_have_the_published_layout_and_take_diffusers_conversion(tiny):
    from diffusers import QwenImageEditPipeline

    layers = 2  # the tiny transformer's blocks
    for name in (*EDIT_FILES, *EDIT_2509_FILES):
        with safe_open(str(tiny["lightning"] / name), "pt") as f:
            keys = set(f.keys())
            assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
        assert keys == {f"transformer_blocks.{i}.{module}.{part}" for i in range(layers)
                        for module in LIGHTNING_MODULES
                        for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    with safe_open(str(tiny["lightning"] / EDIT_FILES[1]), "pt") as f:
        raw = {k: f.get_tensor(k).float() for k in f.keys()}
    converted = QwenImageEditPipeline.lora_state_dict(str(tiny["lightning"]),
                                                      weight_name=EDIT_FILES[1])
    assert len(converted) == layers * len(LIGHTNING_MODULES) * 2
    # diffusers folds alpha / rank into the weights: the same update as the published file's.
    key = "transformer_blocks.1.img_mlp.net.0.proj"
    update = (converted[f"transformer.{key}.lora_B.weight"].float()
              @ converted[f"transformer.{key}.lora_A.weight"].float())
    scale = TINY_ALPHA / TINY_RANK
    expected = raw[f"{key}.lora_up.weight"] @ raw[f"{key}.lora_down.weight"] * scale
    torch.testing.assert_close(update, expected, rtol=2e-2, atol=1e-4)


async def test_editor_edits_equal_diffusers_with_the_lora_loaded_directly(tiny, image):
    from peft.tuners.tuners_utils import BaseTunerLayer

    editor = editor_with(lightning_lora={"steps": 4}, plus_model=PLUS_MODEL)
    editor.reconfigure({"torch_threads": os.cpu_count() or 1})
    adapted = [n for n, m in editor.pipes.edit.transformer.named_modules()
               if isinstance(m, BaseTunerLayer)]
    assert len(adapted) == 2 * len(LIGHTNING_MODULES)
    assert EDIT_FILES[1] in editor.info().model_type

    edited, meta = await served(editor, [image])
    assert (meta["steps"], meta["true_cfg_scale"], meta["pipeline"]) == (4, 1.0, "edit")
    np.testing.assert_array_equal(edited, direct(tiny["edit"], tiny["lightning"], EDIT_FILES[1],
                                                 [image], steps=4))
    # The LoRA is what makes the difference: without it the same call gives another image.
    assert not np.array_equal(edited, direct(tiny["edit"], tiny["lightning"], EDIT_FILES[1],
                                             [image], steps=4, lora=False))

    # Multi-image: the 2509 transformer with the 2509 LoRA, beside the shared text encoder/VAE.
    pair = [image, image[::-1]]
    edited, meta = await served(editor, pair)
    assert meta["pipeline"] == "plus"
    np.testing.assert_array_equal(edited, direct(tiny["plus"], tiny["lightning"],
                                                 EDIT_2509_FILES[1], pair, steps=4))


def write_corrupt(directory, name: str) -> None:
    (directory / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def write_for_more_blocks(directory, name: str) -> None:
    """A well-formed LoRA for a transformer with a block the tiny one lacks."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    from atelier3d.models.edit.qwen_image_edit import TINY_TRANSFORMER

    bigger = QwenImageTransformer2DModel(**TINY_TRANSFORMER | {"num_layers": 3})
    save_file(lightning_state_dict(bigger, seed=0), str(directory / name))


@pytest.mark.parametrize("mode", ["tiny", "auto", "real"])
@pytest.mark.parametrize(("case", "words"), [
    ("missing", "cannot be loaded"),
    ("corrupt", "cannot be loaded"),
    ("more blocks", "does not fit this transformer: 12 of 36 modules"),
])
def test_a_lora_that_cannot_be_loaded_stops_the_start(tiny, tmp_path, mode, case, words):
    name = EDIT_FILES[1]
    if case == "corrupt":
        write_corrupt(tmp_path, name)
    elif case == "more blocks":
        write_for_more_blocks(tmp_path, name)
    weights = str(tmp_path / "no-such-lora") if case == "missing" else str(tmp_path)
    # auto/real: the tiny pipeline as the named weights (they load; the LoRA must not).
    with pytest.raises(LightningLoraError, match="Lightning LoRA") as failed:
        editor_with(models=mode, model=str(tiny["edit"]),
                    lightning_lora={"weights": weights, "weight_name": name})
    message = str(failed.value)
    assert words in message and name in message and "lightning_lora" in message


def test_a_file_missing_from_the_lightning_repository_stops_the_start(tiny):
    with pytest.raises(LightningLoraError, match="Qwen-Image-Edit-Lightning-2steps"):
        editor_with(lightning_lora={"weight_name": "Qwen-Image-Edit-Lightning-2steps.safetensors"})


def test_lightning_off_runs_the_base_schedule_without_a_lora(tiny):
    from atelier3d.models.edit.qwen_image_edit import SCHEDULER_CONFIG, load_edit_pipeline

    pipes = load_edit_pipeline(EditSettings(lightning_lora=None), "tiny", GENERATED)
    assert pipes.lora is None and pipes.plus_lora is None
    assert pipes.edit.scheduler.config.shift_terminal == SCHEDULER_CONFIG["shift_terminal"]
    assert (pipes.settings.default_steps, pipes.settings.default_true_cfg_scale) == (50, 4.0)
