"""Hunyuan3D-Paint (hy3dgen's ``Hunyuan3DPaintPipeline``) on any torch device.

hy3dgen's texture renderer imports ``custom_rasterizer``, a CUDA extension built from source that
no package registry ships. :func:`install_rasterizer` registers the torch rasterizer of
``atelier3d.models.mesh.rasterizer`` under that name where the compiled one is missing, so the
renderer runs from this project's install on the CPU and on any CUDA GPU. :class:`PaintPipeline`
is hy3dgen's pipeline with the two places that hard-code CUDA given the configured device, and
:func:`write_tiny_paint` writes tiny random weights in the official layouts
(``hunyuan3d-paint-v2-0``, ``hunyuan3d-delight-v2-0``) that its own loaders read.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import diffusers
import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
)
from hy3dgen.texgen import hunyuanpaint
from hy3dgen.texgen.hunyuanpaint.unet import modules as unet_modules
from hy3dgen.texgen.hunyuanpaint.unet.modules import UNet2p5DConditionModel
from hy3dgen.texgen.pipelines import Hunyuan3DPaintPipeline, Hunyuan3DTexGenConfig
from hy3dgen.texgen.utils.dehighlight_utils import Light_Shadow_Remover
from hy3dgen.texgen.utils.multiview_utils import Multiview_Diffusion_Net
from PIL import Image

from atelier3d.models.loading import tiny_dir
from atelier3d.models.mesh import rasterizer

logger = logging.getLogger(__name__)

RASTERIZER_MODULE = "custom_rasterizer"
DELIGHT_SUBFOLDER = "hunyuan3d-delight-v2-0"
PAINT_SUBFOLDER = "hunyuan3d-paint-v2-0"
TINY_PAINT_DIR = "hunyuan3d-paint-tiny-random"
RANDOM_INIT_FILE = "atelier3d_random_init.json"  # beside the two subfolders of tiny weights
TINY_VAE_DOWNSAMPLINGS = 6
TINY_RENDER_SIZE = 64  # render and texture size with the tiny weights (hy3dgen's: 2048)
PAINT_PHASES = 5  # delight + UV unwrap, renders, multiview diffusion, bake, inpaint
Rasterizer = Literal["compiled", "torch"]
PhaseCallback = Callable[[int, int], None]


def install_rasterizer() -> Rasterizer:
    """Makes ``import custom_rasterizer`` work: hy3dgen's compiled extension where it is
    installed ("compiled"), else this project's torch one ("torch")."""
    current = sys.modules.get(RASTERIZER_MODULE)
    if current is rasterizer:
        return "torch"
    if current is not None:
        return "compiled"
    try:
        importlib.import_module(RASTERIZER_MODULE)
        return "compiled"
    except ImportError:
        sys.modules[RASTERIZER_MODULE] = rasterizer
        logger.info("custom_rasterizer is not installed: hy3dgen's renderer uses the torch one")
        return "torch"


# ---- loading, on any device ---------------------------------------------------------------------

def paint_dirs(model: str) -> tuple[Path, Path]:
    """(delight, multiview) directories of a paint model: a local directory in the official
    layout, or a hub id (the two subfolders are downloaded, as hy3dgen's from_pretrained does)."""
    root = Path(model).expanduser()
    if not root.is_dir():
        import huggingface_hub

        root = Path(huggingface_hub.snapshot_download(
            repo_id=model, allow_patterns=[f"{DELIGHT_SUBFOLDER}/*", f"{PAINT_SUBFOLDER}/*"]))
    delight, multiview = root / DELIGHT_SUBFOLDER, root / PAINT_SUBFOLDER
    for folder in (delight, multiview):
        if not (folder / "model_index.json").is_file():
            raise OSError(f"{folder} holds no model_index.json")
    return delight, multiview


def is_random_init(model: str) -> bool:
    return (Path(model).expanduser() / RANDOM_INIT_FILE).is_file()


def _dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def _views_to_tensor(views: list[list[Image.Image]], device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """HunyuanPaintPipeline's own conversion of the normal/position views (white behind alpha,
    [B, N, C, H, W] in [0, 1]), onto ``device`` instead of its hard-coded ``"cuda"``."""
    batches = []
    for batch in views:
        tensors = []
        for view in batch:
            img = np.asarray(view, dtype=np.float32) / 255.0
            if img.shape[2] > 3:
                alpha = img[:, :, 3:]
                img = img[:, :, :3] * alpha + np.array([1.0, 1.0, 1.0]) * (1 - alpha)
            tensors.append(torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()
                           .half().to(device=device, dtype=dtype))
        batches.append(torch.cat(tensors, dim=0).unsqueeze(0))
    return torch.cat(batches, dim=0)


class _ViewsOnDevice:
    """The multiview diffusion pipeline, given its condition views as tensors on its own
    device: its ``__call__`` converts lists of images with ``.half().to("cuda")``, which only
    runs on CUDA. Everything else is the pipeline's."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, image: Image.Image, **kwargs: Any) -> Any:
        for key in ("normal_imgs", "position_imgs"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = _views_to_tensor(kwargs[key], self._pipeline.device,
                                               self._pipeline.vae.dtype)
        return self._pipeline(image, **kwargs)


class _MultiviewNet(Multiview_Diffusion_Net):
    """hy3dgen's multiview model (its ``__call__``), loaded as its ``__init__`` loads it, plus
    ``trust_remote_code``: diffusers now refuses the custom pipeline (hy3dgen's
    ``hunyuanpaint/pipeline.py``) and the checkpoint's ``unet/modules.py`` without it (the
    configured paint model is trusted as its code is run); float32 off CUDA."""

    def __init__(self, config: Hunyuan3DTexGenConfig) -> None:
        self.device = config.device
        self.view_size = 512
        pipeline = DiffusionPipeline.from_pretrained(
            config.multiview_ckpt_path, custom_pipeline=str(Path(hunyuanpaint.__file__).parent),
            torch_dtype=_dtype(config.device), trust_remote_code=True)
        pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipeline.scheduler.config, timestep_spacing="trailing")
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = _ViewsOnDevice(pipeline.to(self.device))


class _DelightNet(Light_Shadow_Remover):
    """hy3dgen's light and shadow remover (its ``__call__``), loaded as its ``__init__`` loads
    it but float32 off CUDA."""

    def __init__(self, config: Hunyuan3DTexGenConfig) -> None:
        self.device = config.device
        self.cfg_image = 1.5
        self.cfg_text = 1.0
        dtype = _dtype(config.device)
        pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            config.light_remover_ckpt_path, torch_dtype=dtype, safety_checker=None)
        pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to(self.device, dtype)


class PaintPipeline(Hunyuan3DPaintPipeline):
    """hy3dgen's ``Hunyuan3DPaintPipeline`` (its ``__call__``: delight, UV unwrap, normal and
    position renders, multiview diffusion, bake, inpaint) on ``config.device``: its renderer
    defaults to CUDA and its multiview step hard-codes it; its models load in half precision
    on CUDA, as hy3dgen loads them, and in float32 elsewhere (half is many times slower on the
    CPU: 220 s against 14 s for the tiny VAE's encoder on this machine). A call may name an
    ``on_phase(i, PAINT_PHASES)``, told as each phase of hy3dgen's ``__call__`` ends (the
    methods it calls between them say so; what they compute is hy3dgen's)."""

    def __init__(self, config: Hunyuan3DTexGenConfig) -> None:
        install_rasterizer()
        super().__init__(config)
        self.render.device = config.device
        self._on_phase: PhaseCallback | None = None

    def load_models(self) -> None:
        self.models["delight_model"] = _DelightNet(self.config)
        self.models["multiview_model"] = _MultiviewNet(self.config)

    def __call__(self, mesh: Any, image: Any, on_phase: PhaseCallback | None = None) -> Any:
        self._on_phase = on_phase
        try:
            textured = super().__call__(mesh, image)
        finally:
            self._on_phase = None
        if on_phase is not None:
            on_phase(PAINT_PHASES, PAINT_PHASES)  # inpainted, the textured mesh built
        return textured

    def _phase_done(self, phase: int) -> None:
        if self._on_phase is not None:
            self._on_phase(phase, PAINT_PHASES)

    def render_normal_multiview(self, *args: Any, **kwargs: Any) -> Any:
        self._phase_done(1)  # the image delit, the mesh UV-unwrapped
        return super().render_normal_multiview(*args, **kwargs)

    def render_position_multiview(self, *args: Any, **kwargs: Any) -> Any:
        views = super().render_position_multiview(*args, **kwargs)
        self._phase_done(2)  # normal and position views rendered
        return views

    def bake_from_multiview(self, *args: Any, **kwargs: Any) -> Any:
        self._phase_done(3)  # the multiview diffusion has painted the views
        return super().bake_from_multiview(*args, **kwargs)

    def texture_inpaint(self, *args: Any, **kwargs: Any) -> Any:
        self._phase_done(4)  # the views baked into the texture
        return super().texture_inpaint(*args, **kwargs)


def load_paint_pipeline(model: str, device: str, render_size: int | None = None,
                        texture_size: int | None = None) -> PaintPipeline:
    """The paint pipeline of ``model`` (hub id or local directory) on ``device``; the render
    and texture sizes default to hy3dgen's (2048)."""
    delight, multiview = paint_dirs(model)
    config = Hunyuan3DTexGenConfig(str(delight), str(multiview))
    config.device = device
    if render_size:
        config.render_size = render_size
    if texture_size:
        config.texture_size = texture_size
    return PaintPipeline(config)


# ---- the tiny profile ---------------------------------------------------------------------------

def _tiny_tokenizer() -> Any:
    """A CLIP tokenizer over bytes alone (no merges): every text still tokenizes."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_text_encoder(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    # 6 downsamplings: hy3dgen's 512-pixel views are 8x8 latents
    depth = TINY_VAE_DOWNSAMPLINGS + 1
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * depth,
                         up_block_types=["UpDecoderBlock2D"] * depth,
                         block_out_channels=[4] * depth, norm_num_groups=4, sample_size=512)


def _tiny_unet(in_channels: int, cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=512 >> TINY_VAE_DOWNSAMPLINGS, in_channels=in_channels, out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[16, 32],
        layers_per_block=1, cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        norm_num_groups=8, **extra)


def _write_tiny_delight(folder: Path) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    tokenizer = _tiny_tokenizer()
    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=_tiny_unet(8, 32), scheduler=EulerAncestralDiscreteScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)


def _write_tiny_multiview(folder: Path) -> None:
    """The multiview model in its official layout: diffusers components, and the 2.5D UNet
    (``unet/modules.py``, hy3dgen's own, with ``config.json`` and ``diffusion_pytorch_model.bin``,
    which is what its loader reads)."""
    from diffusers import EulerAncestralDiscreteScheduler
    from transformers import CLIPImageProcessor

    tokenizer = _tiny_tokenizer()
    parts = {"vae": _tiny_vae(), "text_encoder": _tiny_text_encoder(tokenizer),
             "tokenizer": tokenizer, "scheduler": EulerAncestralDiscreteScheduler(),
             "feature_extractor": CLIPImageProcessor()}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    # the 2.5D UNet's camera embedding and learned prompts fix these two sizes
    unet = _tiny_unet(4, 1024, time_embedding_dim=1280)
    unet.save_config(folder / "unet")
    unet_2p5d = UNet2p5DConditionModel(unet)
    torch.save(unet_2p5d.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    shutil.copyfile(unet_modules.__file__, folder / "unet" / "modules.py")
    libraries = {"vae": "diffusers", "text_encoder": "transformers", "tokenizer": "transformers",
                 "scheduler": "diffusers", "feature_extractor": "transformers"}
    index = {"_class_name": "HunyuanPaintPipeline", "_diffusers_version": diffusers.__version__,
             **{name: [libraries[name], type(part).__name__] for name, part in parts.items()},
             "safety_checker": [None, None], "unet": ["modules", "UNet2p5DConditionModel"]}
    # model_index.json last: its presence marks a complete checkpoint
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_paint(out_dir: Path, seed: int = 0) -> Path:
    """Writes tiny random Hunyuan3D-Paint weights in the official layout:
    ``<out_dir>/hunyuan3d-delight-v2-0`` (an InstructPix2Pix pipeline) and
    ``<out_dir>/hunyuan3d-paint-v2-0`` (the multiview pipeline, written last)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RANDOM_INIT_FILE).write_text(json.dumps({"random_init": True}))
    _write_tiny_delight(out_dir / DELIGHT_SUBFOLDER)
    _write_tiny_multiview(out_dir / PAINT_SUBFOLDER)
    return out_dir


def tiny_paint_dir(cache_dir: Path | None = None) -> Path:
    """The tiny paint checkpoint's directory (written once under the cache)."""
    return tiny_dir(cache_dir, f"hunyuan3d/{TINY_PAINT_DIR}", f"{PAINT_SUBFOLDER}/model_index.json",
                    write_tiny_paint)
