"""Qwen-Image-Edit with diffusers: loading (dtype, quantization, Lightning LoRA) and running edits.

The loading code is diffusers' own (``from_pretrained`` of a hub id or a local directory). The
tiny profile has every component of the real repository (transformer, VAE, Qwen2.5-VL text
encoder, tokenizer, processor, scheduler) at toy sizes with random weights, written with
``save_pretrained``, so it loads through exactly the same path; its tokenizer is a small
byte-level BPE trained here, offline. Written pipelines carry ``atelier3d_random_init`` in the
text encoder's config: that is how a loaded model is known to be untrained.

One replica holds one set of weights and three pipelines sharing its modules: the plain
edit, the masked (inpaint) edit and the multi-image (Plus) edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atelier3d import rle
from atelier3d.config import EditSettings, ModelsMode, Quantization, default_cache_dir
from atelier3d.imaging import encode_png
from atelier3d.models.edit.cache import step_cache
from atelier3d.models.edit.lightning import (
    EDIT_2509_FILES,
    EDIT_FILES,
    TINY_LIGHTNING_DIR,
    is_hub_id,
    load_lightning,
    write_tiny_lightning,
)
from atelier3d.models.loading import (
    default_dtype,
    file_sha256,
    load_or_tiny,
    resolve_device,
    resolve_dtype,
    tiny_dir,
)
from atelier3d.stages.edit import PRESETS, EditRequest

logger = logging.getLogger(__name__)

TINY_DIR = "qwen-image-edit-tiny-random"
TINY_PLUS_DIR = "qwen-image-edit-2509-tiny-random"
SPECIAL_TOKENS = (  # in the order of Qwen2.5's vocabulary (151643...)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen/Qwen-Image-Edit's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
    use_dynamic_shifting=True,
)
# What lightx2v/Qwen-Image-Lightning publishes for its LoRAs: the distillation used a constant
# shift of 3 (base_shift = max_shift = log 3) and no terminal shift.
LIGHTNING_SCHEDULER_CONFIG = SCHEDULER_CONFIG | dict(
    base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None,
)
# The tiny profile (docs/architecture.md), with a 2-channel VAE: the pipelines encode every
# input at ~1 MP, which dominates a tiny edit's time (64 px, 2 steps: ~1.5 s here; ~12 s with 96).
TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(base_dim=2, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                temperal_downsample=[False, True, True])
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                  "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=32,
                   fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=112)
TINY_VOCAB = 512
# Masked edits repaint the masked region from pure noise (it hides nothing worth keeping); the
# pipeline keeps the rest by blending the source's latents back in at every step.
INPAINT_STRENGTH = 1.0


def _train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE over the presets' words, wrapped as Qwen2's tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenization, so merges are learned on the pieces it will see.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [text for p in PRESETS.values() for text in (p.prompt, p.negative_prompt)]
    bpe.train_from_iterator(corpus, trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=SPECIAL_TOKENS[1:],
                          model_max_length=32768)


@dataclass(frozen=True)
class EditSizes:
    """The architecture of each component of a written pipeline: keyword arguments of
    ``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage`` and Qwen2.5-VL's text and vision
    configs (the text config's ``vocab_size`` defaults to the tokenizer's)."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    vision: dict[str, Any]


TINY_SIZES = EditSizes(TINY_TRANSFORMER, TINY_VAE, TINY_TEXT, TINY_VISION)


def write_random_edit_pipeline(out_dir: Path, sizes: EditSizes, seed: int = 0, plus: bool = False,
                               dtype: Any = None, device: str = "cpu") -> Path:
    """Writes a random Qwen-Image-Edit pipeline of ``sizes`` in the ``save_pretrained`` layout.

    ``plus``: the Qwen-Image-Edit-2509 stand-in, a ``QwenImageEditPlusPipeline`` with the same
    text encoder, tokenizer and VAE (as the real releases share them) and its own transformer.
    ``dtype``/``device``: where the parameters are created (the full-size models are built on
    the GPU in bfloat16; in float32 on the CPU they would take > 110 GB).
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _train_tokenizer(TINY_VOCAB)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = {"vocab_size": len(tokenizer)} | sizes.text | dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=sizes.vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        atelier3d_random_init=True,
    )
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        vae = AutoencoderKLQwenImage(**sizes.vae)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        if plus:
            torch.manual_seed(seed + 1)  # a transformer of its own after the shared modules
        transformer = QwenImageTransformer2DModel(**sizes.transformer)
    pipe = (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor()),
        transformer=transformer,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    return out_dir


def write_tiny_edit_pipeline(out_dir: Path, seed: int = 0, plus: bool = False) -> Path:
    """The tiny random pipeline (``TINY_SIZES``, float32, on the CPU)."""
    return write_random_edit_pipeline(out_dir, TINY_SIZES, seed, plus)


def tiny_edit_dir(cache_dir: Path | None = None, plus: bool = False) -> Path:
    """The tiny Qwen-Image-Edit (``plus``: Qwen-Image-Edit-2509) pipeline, written once."""
    folder = TINY_PLUS_DIR if plus else TINY_DIR
    return tiny_dir(cache_dir, f"editing/{folder}", "model_index.json",
                    lambda path: write_tiny_edit_pipeline(path, plus=plus))


def tiny_lightning_dir(cache_dir: Path | None = None) -> Path:
    """The tiny stand-in of lightx2v/Qwen-Image-Lightning (its edit files, at their paths, for
    the two tiny transformers), written once."""
    from diffusers import QwenImageTransformer2DModel

    path = (cache_dir or default_cache_dir()) / "editing" / TINY_LIGHTNING_DIR
    if not all((path / name).exists() for name in (*EDIT_FILES, *EDIT_2509_FILES)):
        transformers = [QwenImageTransformer2DModel.from_pretrained(
            tiny_edit_dir(cache_dir, plus), subfolder="transformer") for plus in (False, True)]
        write_tiny_lightning(path, *transformers)
    return path


@dataclass
class EditPipelines:
    """One loaded Qwen-Image-Edit and its three pipelines (shared modules), and their origin."""

    edit: Any  # QwenImageEditPipeline
    inpaint: Any  # QwenImageEditInpaintPipeline
    plus: Any  # QwenImageEditPlusPipeline; None where no multi-image model is configured
    settings: EditSettings
    source: str
    plus_source: str | None  # where the Plus pipeline's transformer came from
    trained: bool
    device: str
    quantization: dict[str, str]  # component -> what was applied
    lora: str | None  # "weights/weight_name" of the Lightning LoRA, when loaded
    plus_lora: str | None  # the same for the Plus transformer, when it is a separate one
    weights_sha256: str

    @property
    def name(self) -> str:
        return self.source.rstrip("/").rsplit("/", 1)[-1] if self.trained else "qwen-edit-random"

    def pick(self, request: EditRequest) -> tuple[str, Any]:
        name = request.pipeline(self.settings.plus_for_single_image)
        return name, getattr(self, name)


def resolve_quantization(choice: Quantization, device: str) -> str:
    resolved = choice if choice != "auto" else ("bitsandbytes_4bit" if device == "cuda" else "none")
    if resolved.startswith("bitsandbytes") and device != "cuda":
        # diffusers refuses to load bitsandbytes weights without a GPU ("No GPU found"), deep
        # inside from_pretrained: say so at start-up, with what works instead.
        raise ValueError(f"edit quantization {resolved} needs a CUDA GPU and this replica runs "
                         "on CPU: use torchao_int8wo or none on CPU")
    return resolved


def component_quantization(component: str, choice: str, dtype: Any) -> Any:
    """diffusers' config for the transformer, transformers' for the text encoder."""
    if component == "transformer":
        from diffusers import BitsAndBytesConfig, TorchAoConfig
        # As diffusers' published nf4 Qwen-Image checkpoints: the first block's modulation is
        # the most sensitive layer.
        skip = ["transformer_blocks.0.img_mod"]
    else:
        from transformers import BitsAndBytesConfig, TorchAoConfig
        # The vision tower's widths do not fit the bitsandbytes kernels; lm_head is unused.
        skip = ["visual", "lm_head"]
    if choice == "torchao_int8wo":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if choice == "bitsandbytes_8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)


def _weights_digest(*sources: str) -> str:
    """sha256 over the pipelines' weight files. A hub snapshot's files are links to blobs named
    by their sha256, which is used as is; a local directory's files are read."""
    digest = hashlib.sha256()
    for source in sources:
        root = Path(source)
        if not root.is_dir():
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(source, local_files_only=True))
        for path in sorted(root.rglob("*.safetensors")):
            blob = path.resolve().name
            if not re.fullmatch(r"[0-9a-f]{64}", blob):
                blob = file_sha256(path)
            digest.update(f"{path.relative_to(root)}:{blob}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class EditSources:
    """Where one replica's weights come from: local directories or hub ids."""

    model: str
    plus_model: str | None  # the Plus pipeline's transformer; == model: the same one
    lightning: str | None  # the Lightning LoRA's repository


def resolve_sources(settings: EditSettings, tiny: bool,
                    cache_dir: Path | None = None) -> EditSources:
    """``tiny``: the tiny stand-ins of the configured models and of a hub Lightning LoRA (a
    local LoRA directory is used as is: a test or a user can name their own)."""
    lora = settings.lightning_lora
    lightning = None if lora is None else (
        str(tiny_lightning_dir(cache_dir)) if tiny and is_hub_id(lora.weights) else lora.weights)
    if tiny:
        model = str(tiny_edit_dir(cache_dir))
        plus = None if settings.multi_image_model is None else (
            str(tiny_edit_dir(cache_dir, plus=True)) if settings.plus_model else model)
        return EditSources(model, plus, lightning)

    def local_or_hub(name: str) -> str:
        local = Path(name).expanduser()
        return str(local) if local.is_dir() else name

    model = local_or_hub(settings.model)
    plus = None if settings.multi_image_model is None else (
        local_or_hub(settings.plus_model) if settings.plus_model else model)
    return EditSources(model, plus, lightning)


def _load(sources: EditSources, settings: EditSettings, device: str,
          quantization: dict[str, str]) -> EditPipelines:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        PipelineQuantizationConfig,
        QwenImageEditInpaintPipeline,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    dtype = resolve_dtype(settings.dtype, device, on_cuda="bfloat16")
    mapping = {component: component_quantization(component, choice, dtype)
               for component, choice in quantization.items() if choice != "none"}
    # dtype at load time: loading in float32 and casting needs > 150 GB for the real model.
    edit = QwenImageEditPipeline.from_pretrained(
        sources.model, dtype=dtype,
        quantization_config=PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None,
    )
    if device != "cpu":  # quantized modules are placed at load; this moves the rest
        edit.to(device)
    plus_components = None
    if sources.plus_model == sources.model:
        plus_components = edit.components
    elif sources.plus_model is not None:
        # Only the transformer differs between the releases: the rest is shared, not loaded twice.
        transformer = QwenImageTransformer2DModel.from_pretrained(
            sources.plus_model, subfolder="transformer", dtype=dtype,
            quantization_config=mapping.get("transformer"))
        if device != "cpu" and "transformer" not in mapping:
            transformer.to(device)
        plus_components = edit.components | {"transformer": transformer}
    # The same modules under the other pipelines' classes. Not ``from_pipe``: it casts every
    # module to its dtype argument (float32 by default), which fails for quantized modules.
    inpaint = QwenImageEditInpaintPipeline(**edit.components)
    plus = None if plus_components is None else QwenImageEditPlusPipeline(**plus_components)
    lora = settings.lightning_lora
    loaded_lora = plus_lora = None
    if lora is not None:
        # Every failure raises (LightningLoraError): the schedule below without the LoRA's
        # weights makes bad edits, so there is no running without it.
        loaded_lora = load_lightning(edit, sources.lightning, lora.weight_name)
        if plus is not None and plus.transformer is not edit.transformer:
            plus_lora = load_lightning(plus, sources.lightning, lora.plus_weight_name)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
        for pipe in (edit, inpaint, plus):
            if pipe is not None:
                pipe.scheduler = scheduler
    for pipe in (edit, inpaint, plus):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)  # progress goes through the reporter
    return EditPipelines(
        edit=edit, inpaint=inpaint, plus=plus, settings=settings, source=sources.model,
        plus_source=sources.plus_model,
        trained=not getattr(edit.text_encoder.config, "atelier3d_random_init", False),
        device=device, quantization=quantization, lora=loaded_lora, plus_lora=plus_lora,
        weights_sha256=_weights_digest(
            *dict.fromkeys(s for s in (sources.model, sources.plus_model) if s)),
    )


def load_edit_pipeline(
    settings: EditSettings, mode: ModelsMode = "auto", cache_dir: Path | None = None
) -> EditPipelines:
    """Loads Qwen-Image-Edit from ``settings.model`` (hub id or local ``save_pretrained`` dir),
    and the multi-image model's transformer and the Lightning LoRA where configured.

    A local directory needs no network (it works with ``HF_HUB_OFFLINE=1``). ``mode="tiny"``
    always loads the tiny random pipelines; ``"real"`` fails when the named weights cannot be
    had; ``"auto"`` falls back to tiny with a loud warning. Settings that cannot work on this
    machine (bitsandbytes without a GPU) raise ``ValueError`` first, and a configured Lightning
    LoRA that cannot be loaded raises ``LightningLoraError``, in every mode.
    """
    device = resolve_device(settings.device, "edit.device")
    quantization = {
        "transformer": resolve_quantization(settings.quantization, device),
        "text_encoder": resolve_quantization(settings.text_encoder_quantization, device),
    }
    return load_or_tiny(
        mode,
        lambda: _load(resolve_sources(settings, False), settings, device, quantization),
        lambda: _load(resolve_sources(settings, True, cache_dir), settings, device, quantization),
        weights="Qwen-Image-Edit weights "
        + " + ".join(repr(m) for m in (settings.model, settings.plus_model) if m),
        consequence="edits will be noise")


class _StageReporter:
    """Reports an edit's stages from inside the pipeline call, and times them.

    The pipelines call back after each denoising step only; the end of encoding (prompt and
    image) is the transformer's first forward, seen with a forward pre-hook.
    """

    def __init__(self, reporter: Any) -> None:
        self.reporter = reporter
        self.marks = {"start": time.perf_counter()}
        reporter.report("encode", 0, 1)

    def first_forward(self, module: Any, args: Any) -> None:
        if "encoded" not in self.marks:
            self.marks["encoded"] = time.perf_counter()
            self.reporter.report("encode", 1, 1)

    def step_end(self, pipe: Any, i: int, t: Any, tensors: dict) -> dict:
        total = pipe.num_timesteps
        self.reporter.report("denoise", i + 1, total)
        if i + 1 == total:
            self.marks["denoised"] = time.perf_counter()
            self.reporter.report("decode", 0, 1)
        return {}

    def decoded(self) -> dict[str, float]:
        self.marks["decoded"] = time.perf_counter()
        self.reporter.report("decode", 1, 1)
        m = self.marks
        return {"encode_ms": (m["encoded"] - m["start"]) * 1000,
                "denoise_ms": (m["denoised"] - m["encoded"]) * 1000,
                "decode_ms": (m["decoded"] - m["denoised"]) * 1000,
                "total_ms": (m["decoded"] - m["start"]) * 1000}


def pipeline_inputs(pipes: EditPipelines, request: EditRequest) -> tuple[str, dict[str, Any]]:
    """The pipeline to call for ``request`` and its arguments (without generator/callbacks)."""
    from PIL import Image

    name, _ = pipes.pick(request)
    images = [Image.fromarray(image) for image in request.images]
    kwargs: dict[str, Any] = dict(
        image=images if name == "plus" else images[0],
        prompt=request.full_prompt,
        negative_prompt=request.full_negative_prompt,
        true_cfg_scale=(request.true_cfg_scale if request.true_cfg_scale is not None
                        else pipes.settings.default_true_cfg_scale),
        num_inference_steps=request.steps or pipes.settings.default_steps,
    )
    if name == "inpaint":
        kwargs |= dict(mask_image=Image.fromarray(request.mask.astype(np.uint8) * 255),
                       strength=INPAINT_STRENGTH)
    else:
        kwargs |= dict(width=request.width, height=request.height)
    return name, kwargs


def run_edit(pipes: EditPipelines, request: EditRequest, reporter: Any) -> dict[str, Any]:
    """Runs one edit, reporting ``encode``, ``denoise`` (one event per step) and ``decode``
    through ``reporter`` (a ``ProgressReporter``); returns the result event's fields."""
    import torch

    name, kwargs = pipeline_inputs(pipes, request)
    pipe = getattr(pipes, name)
    stages = _StageReporter(reporter)
    hook = pipe.transformer.register_forward_pre_hook(stages.first_forward)
    cache = pipes.settings.cache
    try:
        with step_cache(pipe.transformer, cache, kwargs["num_inference_steps"]), \
                torch.inference_mode():
            image = pipe(
                **kwargs,
                generator=torch.Generator(pipes.device).manual_seed(request.seed),
                callback_on_step_end=stages.step_end,
            ).images[0]
    finally:
        hook.remove()
    timings = stages.decoded()
    return {
        "media_type": "image/png",
        "data": encode_png(np.asarray(image)),
        "meta": {
            "seed": request.seed, "steps": kwargs["num_inference_steps"],
            "true_cfg_scale": kwargs["true_cfg_scale"], "width": image.width,
            "height": image.height, "pipeline": name, "preset": request.preset,
            "model": pipes.name, "cache": cache.kind if cache else None,
            # the region repainted, as the replica got it (None: the whole image)
            "mask": rle.encode(request.mask[None])[0] if request.mask is not None else None,
            "timings_ms": {k: round(v, 1) for k, v in timings.items()},
        },
    }
