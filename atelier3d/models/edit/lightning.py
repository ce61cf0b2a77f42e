"""Qwen-Image-Lightning: the step-distillation LoRAs of Qwen-Image-Edit, loaded through diffusers.

The published files (lightx2v/Qwen-Image-Lightning) are not in diffusers' own LoRA layout: each
adapted Linear of ``transformer_blocks.N`` has ``<module>.lora_down.weight`` (rank x in),
``<module>.lora_up.weight`` (out x rank) and ``<module>.alpha``, in bf16. diffusers'
``QwenImageLoraLoaderMixin.lora_state_dict`` recognises them by the ``.alpha`` keys and converts
them (``_convert_non_diffusers_qwen_lora_to_diffusers``: alpha/rank folded into the weights,
``transformer.<module>.lora_A/lora_B``); peft then wraps the named modules. The tiny files the
project writes have that layout and those names, for the tiny transformers, so they take the same
path; only the sizes differ.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TINY_LIGHTNING_DIR = "qwen-image-lightning-tiny-random"
# The Linear layers each transformer block's LoRA adapts in the published files (12 per block:
# 720 for the 60 blocks of Qwen-Image); the modulation layers (img_mod, txt_mod) are left alone.
LIGHTNING_MODULES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
    "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
# The repository's files for the edit models, by base model (their paths in the repository).
EDIT_FILES = tuple(f"Qwen-Image-Edit-Lightning-{steps}steps-V1.0-bf16.safetensors"
                   for steps in (4, 8))
EDIT_2509_FILES = tuple(f"Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-{steps}steps-V1.0-"
                        "bf16.safetensors" for steps in (4, 8))
TINY_RANK = 4
# Not equal to the rank, so the conversion's alpha/rank scaling is exercised.
TINY_ALPHA = 8.0
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class LightningLoraError(RuntimeError):
    """A configured Lightning LoRA that cannot be loaded. Not an ``OSError``/``ValueError``: the
    ``auto`` models mode falls back to tiny weights on those, and a missing LoRA must stop the
    start instead (its schedule without it makes bad edits)."""


def lightning_state_dict(transformer: Any, seed: int) -> dict[str, Any]:
    """A random LoRA for ``transformer`` (a ``QwenImageTransformer2DModel``) in the published
    layout: keys ``transformer_blocks.N.<module>.{lora_down.weight,lora_up.weight,alpha}``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for index, block in enumerate(transformer.transformer_blocks):
        for name in LIGHTNING_MODULES:
            linear = block.get_submodule(name)
            key = f"transformer_blocks.{index}.{name}"
            down = torch.randn(TINY_RANK, linear.in_features, generator=generator)
            up = torch.randn(linear.out_features, TINY_RANK, generator=generator)
            # Large enough to change a tiny edit visibly, small enough to keep it finite.
            state[f"{key}.lora_down.weight"] = (down / linear.in_features**0.5).bfloat16()
            state[f"{key}.lora_up.weight"] = (up * 0.05).bfloat16()
            state[f"{key}.alpha"] = torch.tensor(TINY_ALPHA, dtype=torch.bfloat16)
    return state


def write_tiny_lightning(out_dir: Path, edit_transformer: Any, plus_transformer: Any) -> Path:
    """The repository's edit LoRA files at their paths, random, for the tiny transformers: the
    Qwen-Image-Edit ones for ``edit_transformer``, the -2509 ones for ``plus_transformer``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    files = [(name, edit_transformer) for name in EDIT_FILES]
    files += [(name, plus_transformer) for name in EDIT_2509_FILES]
    for seed, (name, transformer) in enumerate(files):
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(lightning_state_dict(transformer, seed), str(path))
    return out_dir


def is_hub_id(weights: str) -> bool:
    return not Path(weights).expanduser().exists() and HUB_ID.fullmatch(weights) is not None


def load_lightning(pipe: Any, source: str, weight_name: str) -> str:
    """Loads the LoRA ``source``/``weight_name`` (hub id or local directory) into ``pipe``'s
    transformer with diffusers/peft, and checks that every module it adapts was wrapped. Returns
    what was loaded; raises :class:`LightningLoraError` with the cause otherwise."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    where = f"{source}/{weight_name}"
    try:
        # diffusers' own reading and conversion, once; load_lora_weights takes the result.
        state = pipe.lora_state_dict(source, weight_name=weight_name)
        targets = {key.removesuffix(".lora_A.weight") for key in state
                   if key.endswith(".lora_A.weight")}
        pipe.load_lora_weights(state, adapter_name="lightning")
    except Exception as exc:  # hub, safetensors, diffusers and peft errors alike: cannot load
        raise LightningLoraError(
            f"Lightning LoRA {where} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}). Fix "
            "edit.lightning_lora, or set it to null to serve without Lightning (its 4/8-step "
            "no-CFG schedule without the LoRA makes bad edits)") from exc
    wrapped = {f"transformer.{name}" for name, module in pipe.transformer.named_modules()
               if isinstance(module, BaseTunerLayer)}
    missing = sorted(targets - wrapped)
    if not targets or missing:
        what = (f"{len(missing)} of {len(targets)} modules not adapted, e.g. "
                f"{', '.join(missing[:3])}" if targets else "it adapts no module")
        raise LightningLoraError(
            f"Lightning LoRA {where} does not fit this transformer: {what}. Use the file made "
            "for the model, or set edit.lightning_lora to null")
    # What /readyz and recipes show: a hub id as it is, a local folder by its name only (the
    # server's paths are not for its clients).
    shown = source.rstrip("/").rsplit("/", 1)[-1] if Path(source).is_dir() else source
    return f"{shown}/{weight_name}"
