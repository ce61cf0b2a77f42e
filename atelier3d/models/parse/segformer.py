"""Human parsing with SegFormer on the ATR label set (18 classes, as segformer_b2_clothes).

The loading code is transformers' own (``from_pretrained`` of a hub id or a local directory). The
tiny profile is a SegFormer with the same head and label set but four one-block stages, randomly
initialised with a fixed seed and written with ``save_pretrained``, so it loads through exactly the
same path. Written checkpoints carry ``atelier3d_random_init`` in their config: that is how a
loaded model is known to be untrained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atelier3d.config import ModelsMode
from atelier3d.models.loading import file_sha256, load_or_tiny, tiny_dir
from atelier3d.stages.parse import LABEL_IDS, LABELS

logger = logging.getLogger(__name__)

HUB_ID = "mattmdjaga/segformer_b2_clothes"

# Tiny profile (docs/architecture.md): ~0.5 M parameters, round-trips through save_pretrained.
TINY_CONFIG = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                   num_attention_heads=[1, 1, 2, 4], decoder_hidden_size=64)

# MiT-b2, the encoder of the real checkpoint (for benchmarks at full cost).
B2_CONFIG = dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512],
                 num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=768)

TINY_DIR = "segformer-tiny-random"

B2_DIR = "segformer-b2-random"


def _write_random_segformer(out_dir: Path, seed: int, **config: Any) -> Path:
    import torch
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    cfg = SegformerConfig(
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id=LABEL_IDS,
        atelier3d_random_init=True,
        **config,
    )
    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(cfg).eval()
    # The real checkpoint's preprocessing: 512x512 bilinear, ImageNet mean/std, labels as they are.
    processor = SegformerImageProcessor(size={"height": 512, "width": 512}, do_reduce_labels=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def write_tiny_segformer(out_dir: Path, seed: int = 0) -> Path:
    """Writes the tiny random SegFormer (ATR 18) in the ``save_pretrained`` layout."""
    return _write_random_segformer(Path(out_dir), seed, **TINY_CONFIG)


def write_random_segformer_b2(out_dir: Path, seed: int = 0) -> Path:
    """Writes a B2-size SegFormer with random weights: the real model's cost, for benchmarks."""
    return _write_random_segformer(Path(out_dir), seed, **B2_CONFIG)


def tiny_segformer_dir(cache_dir: Path | None = None) -> Path:
    return tiny_dir(cache_dir, f"parsing/{TINY_DIR}", "config.json", write_tiny_segformer)


@dataclass
class Parser:
    """A loaded SegFormer with its image processor, and where it came from."""

    model: Any  # SegformerForSemanticSegmentation, in eval mode
    processor: Any  # SegformerImageProcessor
    source: str
    trained: bool

    @property
    def name(self) -> str:
        return self.source.rstrip("/").rsplit("/", 1)[-1] if self.trained else "segformer-random"

    def weights_sha256(self) -> str:
        """Digest of the weight files as loaded (a local dir, or the hub cache's snapshot)."""
        return file_sha256(*_weight_files(self.source))


def _weight_files(source: str) -> list[Path]:
    root = Path(source)
    if root.is_dir():
        return sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "model.safetensors")
    return [Path(cached)] if isinstance(cached, str) else []


def _from_pretrained(source: str, device: str) -> Parser:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    model = SegformerForSemanticSegmentation.from_pretrained(source).eval().to(device)
    if model.config.num_labels != len(LABELS):
        raise ValueError(f"{source} has {model.config.num_labels} labels, ATR parsing needs 18")
    processor = SegformerImageProcessor.from_pretrained(source)
    trained = not getattr(model.config, "atelier3d_random_init", False)
    return Parser(model=model, processor=processor, source=source, trained=trained)


def load_parser(
    model_id_or_dir: str = HUB_ID,
    mode: ModelsMode = "auto",
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> Parser:
    """Loads SegFormer from a hub id or a local ``save_pretrained`` directory.

    A local directory needs no network (it works with ``HF_HUB_OFFLINE=1``); a hub id goes through
    the Hugging Face cache. ``mode="tiny"`` always loads the tiny random model; ``"real"`` fails
    when the named weights cannot be had; ``"auto"`` falls back to tiny with a loud warning.
    """
    local = Path(model_id_or_dir).expanduser()
    source = str(local) if local.is_dir() else model_id_or_dir
    # transformers raises OSError for missing/offline repos
    return load_or_tiny(
        mode, lambda: _from_pretrained(source, device),
        lambda: _from_pretrained(str(tiny_segformer_dir(cache_dir)), device),
        weights=f"SegFormer weights {model_id_or_dir!r}",
        consequence="parse maps will be meaningless")


def parse(model: Any, processor: Any, image_rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8 ATR label ids, as the model card does it:
    processor -> logits at 1/4 of 512x512 -> bilinear upsample to the input size -> argmax."""
    import torch

    if not image_rgb.flags.writeable:  # e.g. from the object store; torch warns on read-only
        image_rgb = image_rgb.copy()
    inputs = processor(images=image_rgb, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(model.device, model.dtype)
    with torch.inference_mode():
        logits = model(pixel_values=pixel_values).logits
        upsampled = torch.nn.functional.interpolate(
            logits.float(), size=image_rgb.shape[:2], mode="bilinear", align_corners=False
        )
        return upsampled.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
