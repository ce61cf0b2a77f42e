"""k8s/Dockerfile installs the GPU install set exactly as the Makefile installs the CPU one, on
what the GPU runs use, and k8s/build_and_smoke.sh says plainly where it cannot build. Reading the
files only (no Docker, no network): a drift between them fails here, before anyone builds."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "k8s" / "Dockerfile"
SCRIPT = ROOT / "k8s" / "build_and_smoke.sh"
# The GPU machines' Python and torch build (benchmarks/gpu/prepare.sh fetches cp312 wheels for
# their torch cu130).
PYTHON = "3.12"
TORCH_INDEX = "https://download.pytorch.org/whl/cu130"


def logical_lines(text: str) -> list[str]:
    """Lines with their ``\\`` continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.rstrip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def commands(text: str, prefix: str) -> list[list[str]]:
    """The shell commands of the lines starting with ``prefix`` (``RUN``, or a recipe's tab),
    split at ``&&``, as words."""
    out = []
    for line in logical_lines(text):
        if line.startswith(prefix):
            for command in line.removeprefix(prefix).split("&&"):
                out.append(shlex.split(command))
    return out


def is_pip(words: list[str], subcommand: str) -> bool:
    """``pip <subcommand> ...`` (the image), or ``$(PIP) <subcommand> ...`` (the Makefile)."""
    return len(words) > 1 and words[0] in ("pip", "$(PIP)") and words[1] == subcommand


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def target(words: list[str]) -> str:
    """The last word: what pip installs (``.[extras]`` or ``-e .[extras]``)."""
    return words[-1]


def extras(spec: str) -> set[str]:
    match = re.fullmatch(r"\.\[([a-z,]+)\]", spec)
    assert match, spec
    return set(match[1].split(","))


def docker_commands() -> list[list[str]]:
    return commands(DOCKERFILE.read_text(), "RUN ")


def make_commands() -> list[list[str]]:
    text = (ROOT / "Makefile").read_text()
    for name, value in re.findall(r"^(CONSTRAINTS|WHEELS) := (.+)$", text, re.MULTILINE):
        text = text.replace(f"$({name})", value)  # the files and folders, not the tools
    return commands(text, "\t")


def test_the_image_installs_the_gpu_set_as_the_makefile_installs_the_cpu_set():
    docker, make = docker_commands(), make_commands()
    (package,) = [c for c in docker if is_pip(c, "install") and target(c).startswith(".[")]
    (dev,) = [c for c in make if is_pip(c, "install") and "-e" in c]
    # Same extras, the GPU build of ONNX Runtime for the CPU one, no test tools in the image.
    assert extras(target(package)) == extras(target(dev)) - {"cpu", "test"} | {"gpu"}
    assert option(package, "-c") == option(dev, "-c") == "constraints/tested.txt"
    # The rebuilt hy3dgen wheel: written by constraints/hy3dgen_wheel.py to the folder pip is
    # given with --find-links, before the install, in both.
    for cmds, install in ((docker, package), (make, dev)):
        wheel = next(c for c in cmds if "constraints/hy3dgen_wheel.py" in c)
        assert cmds.index(wheel) < cmds.index(install)
        assert wheel[wheel.index("constraints/hy3dgen_wheel.py") + 1] == option(
            install, "--find-links")
        assert any(is_pip(c, "check") for c in cmds[cmds.index(install) + 1:]), "no pip check"


def test_the_image_has_the_gpu_runs_python_torch_build_and_system_libraries():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.MULTILINE)
    image, tag = base.split(":")
    manifests = yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())
    (service,) = [m for m in manifests if m and m.get("kind") == "RayService"]
    ray_version = service["spec"]["rayClusterConfig"]["rayVersion"]
    # Ray's image of the manifest's Ray, with the GPU machines' Python and CUDA.
    assert (image, tag) == ("rayproject/ray", f"{ray_version}-py{PYTHON.replace('.', '')}-gpu")
    prepare = (ROOT / "benchmarks" / "gpu" / "prepare.sh").read_text()
    assert f"--python-version {PYTHON}" in prepare
    # torch and torchvision: the CUDA 13.0 builds of the tested versions, before the package.
    (torch,) = [c for c in docker_commands() if is_pip(c, "install") and "torch" in c]
    assert option(torch, "--index-url") == TORCH_INDEX
    assert option(torch, "-c") == "constraints/tested.txt"
    assert {"torch", "torchvision"} <= set(torch)
    # What prepare.sh carries to the GPU machine for pymeshlab's Qt, the image installs.
    download = re.search(r"apt-get download -q ([^)]+)\)", "\n".join(logical_lines(prepare)))
    carried = set(download[1].split())
    (apt,) = [c for c in docker_commands() if "apt-get" in c and "install" in c]
    assert carried and carried <= set(apt), carried - set(apt)


def test_build_and_smoke_says_why_it_cannot_build(tmp_path):
    """Without docker on PATH; and, where a docker client is installed, with no daemon behind
    the address it is given."""
    tools = tmp_path / "bin"  # the script's own tools, and no docker
    tools.mkdir()
    for tool in ("bash", "dirname"):
        (tools / tool).symlink_to(subprocess.run(["which", tool], capture_output=True,
                                                 text=True, check=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    done = subprocess.run([str(tools / "bash"), str(SCRIPT)], env=env | {"PATH": str(tools)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "docker is not installed on this machine: the image cannot be built" in done.stderr
    docker = shutil.which("docker")
    if docker is not None:
        (tools / "docker").symlink_to(docker)
        nowhere = f"unix://{tmp_path / 'no-daemon.sock'}"
        done = subprocess.run([str(tools / "bash"), str(SCRIPT)], capture_output=True,
                              text=True, timeout=60,
                              env=env | {"PATH": str(tools), "DOCKER_HOST": nowhere})
        assert done.returncode == 2, done.stderr
        assert (f"docker is installed but no Docker daemon answers (`docker info` fails for "
                f"DOCKER_HOST={nowhere})") in done.stderr
