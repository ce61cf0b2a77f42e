"""The machine's GPUs, the memory each process holds on them, and the packaged Serve profile
that fits them (``atelier3d serve``'s default when no ``--config`` is given)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, Field

LOCAL_PROFILE = "local.yaml"
GPU_24G_PROFILE = "gpu-24g.yaml"
GPU_80G_PROFILE = "gpu-80g.yaml"

# The smallest card each GPU profile's memory plan (the comment at the top of its YAML) fits,
# in GiB of total memory as the driver reports it. gpu-24g's plan sums 24.0 GiB with no
# headroom and names the L4/A10G (22.5 GiB reported) as the tight end of its class; gpu-80g's
# sums 74.4 GiB plus ~5 GiB for fragmentation and peaks: an H100/A100 80GB (79.6-80 GiB).
GPU_PROFILES_BY_MIN_GIB: tuple[tuple[float, str], ...] = (
    (79.0, GPU_80G_PROFILE),
    (22.0, GPU_24G_PROFILE),
)

# The kernel driver's files: without them no CUDA device exists (containers get them mounted).
NVIDIA_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl")
NVIDIA_SMI_QUERY = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
NVIDIA_SMI_PROCESSES = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


class Gpu(BaseModel):
    name: str
    memory_mib: int = Field(gt=0, description="total memory, as the driver reports it")

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


class ProfileChoice(BaseModel):
    file: str = Field(description="a packaged config under atelier3d/serve/configs")
    reason: str = Field(description="one line for the operator: which profile and why")


def detect_gpus() -> list[Gpu]:
    """The GPUs this process may use: nvidia-smi's list (no CUDA library loaded into this
    process), else torch.cuda's where the NVIDIA driver is loaded but nvidia-smi is absent,
    else none."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is not None:
        try:
            result = subprocess.run([nvidia_smi, *NVIDIA_SMI_QUERY], capture_output=True,
                                    text=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return []  # a driver that does not answer serves nothing
        return visible_gpus(result.stdout, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not any(Path(p).exists() for p in NVIDIA_DRIVER_PATHS):
        return []
    # torch only here: loading it costs seconds and ~1 GiB of memory.
    import torch

    if not torch.cuda.is_available():
        return []
    return [Gpu(name=torch.cuda.get_device_name(i),
                memory_mib=torch.cuda.get_device_properties(i).total_memory // 2**20)
            for i in range(torch.cuda.device_count())]


def visible_gpus(nvidia_smi_csv: str, cuda_visible_devices: str | None) -> list[Gpu]:
    """Parses ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,
    nounits`` and keeps the cards ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) leaves visible,
    as Ray and CUDA do; nvidia-smi itself ignores that variable."""
    rows = [[cell.strip() for cell in line.split(",")]
            for line in nvidia_smi_csv.splitlines() if line.strip()]
    cards = {(index, uuid): Gpu(name=name, memory_mib=int(float(memory)))
             for index, uuid, name, memory in rows}
    if cuda_visible_devices is None:
        return list(cards.values())
    wanted = [token.strip() for token in cuda_visible_devices.split(",") if token.strip()]
    return [gpu for token in wanted for (index, uuid), gpu in cards.items()
            if token == index or (token.startswith("GPU-") and uuid.startswith(token))]


def choose_profile(gpus: list[Gpu]) -> ProfileChoice:
    """The packaged profile for these GPUs. With several, the smallest decides: Ray's GPU
    fractions say how much of *a* card a replica takes, not which card."""
    if not gpus:
        return ProfileChoice(file=LOCAL_PROFILE, reason=f"profile {LOCAL_PROFILE}: no GPU found")
    smallest = min(gpus, key=lambda gpu: gpu.memory_mib)
    names = sorted({gpu.name for gpu in gpus})
    gib = f"{smallest.memory_gib:.0f} GiB"
    if len(names) > 1:
        cards = f"{len(gpus)} GPUs ({', '.join(names)}), the smallest with {gib}"
    else:
        cards = f"{len(gpus)}x {names[0]} with {gib}{' each' if len(gpus) > 1 else ''}"
    for min_gib, profile in GPU_PROFILES_BY_MIN_GIB:
        if smallest.memory_gib >= min_gib:
            return ProfileChoice(file=profile, reason=f"profile {profile}: {cards}")
    min_gib, profile = GPU_PROFILES_BY_MIN_GIB[-1]
    return ProfileChoice(
        file=LOCAL_PROFILE,
        reason=f"profile {LOCAL_PROFILE}: {cards}, less than the {min_gib:.0f} GiB that the "
               f"smallest GPU profile ({profile}) needs, so the models run on the CPU "
               f"(--config picks a profile)")


def gpu_memory_by_process() -> dict[int, float] | None:
    """MiB of GPU memory each process holds now, by pid, as the driver counts it (CUDA context,
    caching allocators and ONNX Runtime's arena included; summed over cards), or None where no
    GPU can be read (no nvidia-smi, or it fails). In a container with its own pid namespace the
    driver may report the host's pids."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    try:
        result = subprocess.run([nvidia_smi, *NVIDIA_SMI_PROCESSES], capture_output=True,
                                text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return memory_by_pid(result.stdout)


def memory_by_pid(nvidia_smi_csv: str) -> dict[int, float]:
    """Parses ``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``:
    MiB per pid, summed over the cards a process uses; rows the driver cannot tell (``[N/A]``)
    are left out."""
    usage: dict[int, float] = {}
    for line in nvidia_smi_csv.splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != 2 or not cells[0].isdigit():
            continue
        try:
            mib = float(cells[1])
        except ValueError:
            continue
        usage[int(cells[0])] = usage.get(int(cells[0]), 0.0) + mib
    return usage
