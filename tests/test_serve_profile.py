"""`atelier3d serve` without --config picks the packaged profile that fits the machine's GPUs
and says which and why. The GPUs are faked at the one function that reads them
(`hardware.detect_gpus`); the choice, the CLI and the config it resolves are the real ones."""

from __future__ import annotations

import pytest
import yaml

from atelier3d import cli, hardware
from atelier3d.hardware import Gpu
from atelier3d.serve import runner

# memory.total as nvidia-smi reports these cards, in MiB
RTX_4090 = Gpu(name="NVIDIA GeForce RTX 4090", memory_mib=24564)
L4 = Gpu(name="NVIDIA L4", memory_mib=23034)
RTX_A6000 = Gpu(name="NVIDIA RTX A6000", memory_mib=49140)
H100 = Gpu(name="NVIDIA H100 80GB HBM3", memory_mib=81559)
H200 = Gpu(name="NVIDIA H200", memory_mib=143771)
A100_80 = Gpu(name="NVIDIA A100-SXM4-80GB", memory_mib=81920)
RTX_4060 = Gpu(name="NVIDIA GeForce RTX 4060", memory_mib=8188)

CASES = {
    "no GPU": ([], "local.yaml", "profile local.yaml: no GPU found"),
    "24 GB": ([RTX_4090], "gpu-24g.yaml",
              "profile gpu-24g.yaml: 1x NVIDIA GeForce RTX 4090 with 24 GiB"),
    "22 GiB L4": ([L4], "gpu-24g.yaml", "profile gpu-24g.yaml: 1x NVIDIA L4 with 22 GiB"),
    "48 GB": ([RTX_A6000], "gpu-24g.yaml",
              "profile gpu-24g.yaml: 1x NVIDIA RTX A6000 with 48 GiB"),
    "80 GB": ([H100], "gpu-80g.yaml", "profile gpu-80g.yaml: 1x NVIDIA H100 80GB HBM3 with 80 GiB"),
    "141 GB": ([H200], "gpu-80g.yaml", "profile gpu-80g.yaml: 1x NVIDIA H200 with 140 GiB"),
    "2 GPUs": ([A100_80, A100_80], "gpu-80g.yaml",
               "profile gpu-80g.yaml: 2x NVIDIA A100-SXM4-80GB with 80 GiB each"),
    "2 GPUs, mixed": ([H100, RTX_A6000], "gpu-24g.yaml",
                      "profile gpu-24g.yaml: 2 GPUs (NVIDIA H100 80GB HBM3, NVIDIA RTX A6000), "
                      "the smallest with 48 GiB"),
    "8 GB": ([RTX_4060], "local.yaml",
             "profile local.yaml: 1x NVIDIA GeForce RTX 4060 with 8 GiB, less than the 22 GiB "
             "that the smallest GPU profile (gpu-24g.yaml) needs, so the models run on the CPU "
             "(--config picks a profile)"),
}


def serve_print_config(monkeypatch, capsys, gpus: list[Gpu], *args: str) -> tuple[str, dict]:
    """Runs `atelier3d serve --print-config` on a machine with ``gpus``; returns the line that
    says which config and why, and the config printed."""
    monkeypatch.setattr(hardware, "detect_gpus", lambda: gpus)
    assert cli.main(["serve", "--print-config", "--port", "8123", *args]) == 0
    reason, _, printed = capsys.readouterr().out.partition("\n")
    return reason, yaml.safe_load(printed)


@pytest.mark.parametrize(("gpus", "profile", "reason"), CASES.values(), ids=CASES.keys())
def test_serve_picks_the_profile_that_fits_the_gpus(monkeypatch, capsys, gpus, profile, reason):
    printed_reason, config = serve_print_config(monkeypatch, capsys, gpus)
    assert printed_reason == reason
    assert config == runner.load_serve_config(runner.packaged_config_path(profile), port=8123)


def test_the_three_profiles_differ():
    """What makes the comparison with the chosen file above tell the profiles apart."""
    configs = [runner.load_serve_config(runner.packaged_config_path(name))
               for name in ("local.yaml", "gpu-24g.yaml", "gpu-80g.yaml")]
    assert configs[0] != configs[1] != configs[2] != configs[0]


def test_config_flag_wins_over_the_gpus(monkeypatch, capsys):
    local = runner.packaged_config_path("local.yaml")
    reason, config = serve_print_config(monkeypatch, capsys, [H200], "--config", str(local))
    assert reason == f"config {local}: given by --config"
    assert config == runner.load_serve_config(local, port=8123)


NVIDIA_SMI_CSV = """\
0, GPU-1f2e3d4c-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 81559
1, GPU-9a8b7c6d-6666-7777-8888-999900001111, NVIDIA RTX A6000, 49140
"""


@pytest.mark.parametrize(("cuda_visible_devices", "names"), [
    (None, ["NVIDIA H100 80GB HBM3", "NVIDIA RTX A6000"]),
    ("1", ["NVIDIA RTX A6000"]),
    ("1,0", ["NVIDIA RTX A6000", "NVIDIA H100 80GB HBM3"]),
    ("GPU-1f2e3d4c", ["NVIDIA H100 80GB HBM3"]),
    ("", []),
])
def test_nvidia_smi_listing_honours_cuda_visible_devices(cuda_visible_devices, names):
    gpus = hardware.visible_gpus(NVIDIA_SMI_CSV, cuda_visible_devices)
    assert [gpu.name for gpu in gpus] == names
    assert {gpu.name: gpu.memory_mib for gpu in gpus}.get("NVIDIA RTX A6000", 49140) == 49140


def test_nvidia_smi_process_memory_is_summed_per_pid():
    # One process on two cards, one the driver cannot measure, and a blank line.
    csv = "4242, 5120\n4242, 1024\n77, [N/A]\n\n91, 300\n"
    assert hardware.memory_by_pid(csv) == {4242: 6144.0, 91: 300.0}
