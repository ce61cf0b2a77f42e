"""What every model loader does the same way: the device and dtype it runs in, the tiny random
weights written once under the cache, the ``models: auto|tiny|real`` fallback, and file digests.

torch is imported where a device or dtype is resolved only: the SAM decoder replica imports this
module and runs without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from filelock import FileLock

from atelier3d.config import ModelsMode, default_cache_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

FALLBACK_WARNING = "FALLING BACK TO TINY UNTRAINED WEIGHTS"


def resolve_device(device: str, setting: str) -> str:
    """``auto`` is CUDA where a GPU is visible, else CPU. An explicit ``cuda`` without a visible
    GPU fails here, at start-up, naming ``setting``, rather than deep inside a library's load."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting} is cuda but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str, on_cuda: str) -> torch.dtype:
    """``auto`` is ``on_cuda`` (the model's own half precision) on CUDA, float32 elsewhere."""
    import torch

    if dtype == "auto":
        dtype = on_cuda if device == "cuda" else "float32"
    return getattr(torch, dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Modules built inside create their parameters in ``dtype`` (None: unchanged): a full-size
    model built in float32 first would need twice its memory."""
    import torch

    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def tiny_dir(cache_dir: Path | None, folder: str, marker: str,
             write: Callable[[Path], object]) -> Path:
    """``<cache>/<folder>``, holding tiny random weights: ``write(path)`` makes them the first
    time (``marker``, a file written last, is how a complete copy is known)."""
    path = (cache_dir or default_cache_dir()) / folder
    if not (path / marker).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replicas (or test processes) starting together on one cache: one writes, the others
        # wait for it instead of reading a half-written copy.
        with FileLock(f"{path}.lock"):
            if not (path / marker).exists():
                write(path)
    return path


def load_or_tiny(mode: ModelsMode, load_named: Callable[[], T], load_tiny: Callable[[], T], *,
                 weights: str, consequence: str,
                 errors: tuple[type[Exception], ...] = (OSError, ValueError),
                 fallback: str = FALLBACK_WARNING) -> T:
    """The ``models`` policy: ``tiny`` loads the tiny random weights; ``real`` loads the named
    weights or raises; ``auto`` tries the named ones and, when ``errors`` says they cannot be
    had, falls back to tiny with a loud warning (the loaded model then reports itself untrained).
    ``weights`` names what failed, ``fallback`` (in capitals) what runs instead and
    ``consequence`` what that means for users."""
    if mode == "tiny":
        return load_tiny()
    try:
        return load_named()
    except errors as exc:
        if mode == "real":
            raise
        logger.warning("%s unavailable (%s): %s; %s (HF_HUB_OFFLINE=%s)", weights,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                       fallback, consequence, os.environ.get("HF_HUB_OFFLINE", ""))
        return load_tiny()


def weights_label(trained: bool) -> str:
    """How ``ModelInfo.weights`` says where weights came from."""
    return "trained" if trained else "untrained"


def file_sha256(*paths: Path | str) -> str:
    """sha256 of a (possibly multi-GB) file's bytes, read in 1 MiB blocks; of several files',
    one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
