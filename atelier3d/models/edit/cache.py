"""The edit transformer's step cache (``edit.cache``), through diffusers' cache hooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from atelier3d.config import EditCache, FirstBlockCache, MagCache, TaylorSeerCache


def diffusers_cache_config(cache: EditCache, steps: int) -> Any:
    """The diffusers config object for ``cache`` on an edit of ``steps`` denoising steps."""
    import torch
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    match cache:
        case FirstBlockCache():
            return FirstBlockCacheConfig(threshold=cache.threshold)
        case MagCache():
            # MagCache counts steps to know where it is in the schedule: it is built per edit.
            return MagCacheConfig(
                threshold=cache.threshold, max_skip_steps=cache.max_skip_steps,
                retention_ratio=cache.retention_ratio, num_inference_steps=steps,
                mag_ratios=torch.tensor(cache.mag_ratios))
        case TaylorSeerCache():
            return TaylorSeerCacheConfig(
                cache_interval=cache.cache_interval,
                disable_cache_before_step=cache.disable_cache_before_step,
                max_order=cache.max_order, taylor_factors_dtype=torch.float32)
    raise TypeError(f"unknown cache settings {cache!r}")


@contextmanager
def step_cache(transformer: Any, cache: EditCache | None, steps: int) -> Iterator[None]:
    """Runs the body with ``cache`` enabled on ``transformer`` (nothing when None), and removes
    its hooks after, so that each edit starts from an empty cache and the next one may differ."""
    if cache is None:
        yield
        return
    transformer.enable_cache(diffusers_cache_config(cache, steps))
    try:
        yield
    finally:
        transformer.disable_cache()
