"""SAM checkpoints: where they come from, how they are built, and the tiny ones tests use.

The loading code is segment-anything's own (`sam_model_registry` + `torch.load` of a state dict).
A checkpoint is named by a local path, an http(s) URL or a model type ("vit_b") that maps to
Meta's official release. The tiny profile registers one extra architecture, ``vit_tiny``, built by
the library's own ``_build_sam`` so its state dict has the official key layout.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from atelier3d.api.common import ModelInfo
from atelier3d.config import AppConfig, ModelsMode, default_cache_dir
from atelier3d.models.loading import file_sha256, load_or_tiny, tiny_dir, weights_label

logger = logging.getLogger(__name__)

OFFICIAL_CHECKPOINTS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}

# (embed_dim, depth, heads, global_attn_indexes): small enough to encode in well under a second on
# two cores, but the prompt encoder and mask decoder stay full size (256 channels, 64x64 grid), so
# the ONNX decoder graph is exactly the one real checkpoints export.
TINY_VIT = (64, 2, 2, (1,))

TINY_NAME = "sam_vit_tiny_random.pth"

RANDOM_VIT_B_NAME = "sam_vit_b_random.pth"


def register_tiny_architecture() -> None:
    """Adds ``vit_tiny`` to segment-anything's registry (idempotent)."""
    from segment_anything.build_sam import _build_sam, sam_model_registry

    if "vit_tiny" not in sam_model_registry:
        dim, depth, heads, global_attn = TINY_VIT
        sam_model_registry["vit_tiny"] = functools.partial(
            _build_sam,
            encoder_embed_dim=dim,
            encoder_depth=depth,
            encoder_num_heads=heads,
            encoder_global_attn_indexes=list(global_attn),
        )


@dataclass(frozen=True)
class SamCheckpoint:
    """A resolved checkpoint: a file on disk, its architecture, and whether it was trained."""

    path: Path
    model_type: str
    trained: bool

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def build(self):
        """Builds the torch ``Sam`` module through the library's registry, in eval mode."""
        from segment_anything import sam_model_registry

        register_tiny_architecture()
        return sam_model_registry[self.model_type](checkpoint=str(self.path)).eval()


def write_random_checkpoint(path: Path, model_type: str, seed: int = 0) -> Path:
    """Writes a randomly initialised SAM state dict in the official layout (atomically)."""
    import torch
    from segment_anything import sam_model_registry

    register_tiny_architecture()
    torch.manual_seed(seed)
    sam = sam_model_registry[model_type](checkpoint=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(sam.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def tiny_checkpoint(cache_dir: Path | None = None) -> SamCheckpoint:
    folder = tiny_dir(cache_dir, "sam", TINY_NAME,
                      lambda path: write_random_checkpoint(path / TINY_NAME, "vit_tiny"))
    return SamCheckpoint(path=folder / TINY_NAME, model_type="vit_tiny", trained=False)


def _download(url: str, dest: Path, timeout_s: float) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".part{os.getpid()}")
    logger.info("downloading %s -> %s", url, dest)
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
        for block in iter(lambda: response.read(1 << 20), b""):
            out.write(block)
    os.replace(tmp, dest)
    return dest


def _model_type_from_name(name: str) -> str:
    for model_type in ("vit_tiny", "vit_h", "vit_l", "vit_b"):
        if model_type in name:
            return model_type
    raise ValueError(f"cannot tell the SAM architecture of {name!r}; set sam.model_type")


def resolve_checkpoint(
    checkpoint: str,
    mode: ModelsMode = "auto",
    model_type: str | None = None,
    cache_dir: Path | None = None,
    download_timeout_s: float = 20.0,
) -> SamCheckpoint:
    """Finds the checkpoint named by ``checkpoint`` (path, URL or model type).

    ``mode="tiny"`` always returns the tiny random checkpoint; ``"real"`` fails when the real
    weights cannot be had; ``"auto"`` falls back to the tiny one with a loud warning.
    """
    cache = cache_dir or default_cache_dir()
    return load_or_tiny(
        mode,
        lambda: _named_checkpoint(checkpoint, model_type, cache, download_timeout_s),
        lambda: tiny_checkpoint(cache),
        weights=f"SAM weights {checkpoint!r}", consequence="masks will be meaningless")


def _named_checkpoint(checkpoint: str, model_type: str | None, cache: Path,
                      download_timeout_s: float) -> SamCheckpoint:
    if checkpoint in OFFICIAL_CHECKPOINTS:
        model_type = model_type or checkpoint
        checkpoint = OFFICIAL_CHECKPOINTS[checkpoint]
    if checkpoint.startswith(("http://", "https://")):
        dest = cache / "sam" / checkpoint.rsplit("/", 1)[-1]
        if not dest.exists():
            _download(checkpoint, dest, download_timeout_s)
        path = dest
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint {path} does not exist")
    model_type = model_type or _model_type_from_name(path.name)
    trained = "random" not in path.name
    return SamCheckpoint(path=path, model_type=model_type, trained=trained)


def sam_checkpoint(cfg: AppConfig) -> SamCheckpoint:
    return resolve_checkpoint(cfg.sam.checkpoint, cfg.models, cfg.sam.model_type, cfg.cache_path)


def sam_info(checkpoint: SamCheckpoint) -> ModelInfo:
    return ModelInfo(
        model_type=checkpoint.model_type,
        weights=weights_label(checkpoint.trained),
        checkpoint_sha256=checkpoint.sha256,
    )
