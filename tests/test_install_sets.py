"""The install sets: resolved against the package index without installing, and the client alone.

``.[server,cpu]`` and ``.[server,gpu]`` must each hold exactly one ONNX Runtime (the CPU build,
or the GPU build with its CUDA provider: both install the same ``onnxruntime`` module) and one
OpenCV, peft in both (the Lightning LoRA can be configured in every profile), bitsandbytes only
on the GPU, and no declared dependency that nothing imports. pip resolves the union
``.[server,cpu,gpu]`` once (``--dry-run --report``: nothing is installed) with the constraints the
Makefile uses; each set is the closure of its extras in that resolution, which is a valid
resolution of the set itself. ``--use-feature=fast-deps`` reads a wheel's metadata with HTTP
range requests where the index serves no separate metadata file (PEP 658), so the CUDA wheels are
never downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.install

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "tested.txt"
HY3DGEN_WHEEL = ROOT / "constraints" / "hy3dgen_wheel.py"
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu"}
OPENCV_BUILDS = {"opencv-python", "opencv-python-headless", "opencv-contrib-python",
                 "opencv-contrib-python-headless"}
SERVER_ONLY = {"torch", "ray", "gradio", "fastapi", "diffusers", "transformers", "hy3dgen"}
# Distributions whose import name is not their own name with '_' for '-'.
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "scikit-image": "skimage",
                "opencv-python-headless": "cv2", "onnxruntime-gpu": "onnxruntime"}
# Declared, and used, without an import statement of ours.
USED_WITHOUT_IMPORT = {
    "onnx": "torch.onnx.export writes the SAM decoder with it",
    "torchvision": "hy3dgen.shapegen imports it without declaring it; pinned beside torch",
    "peft": "diffusers' load_lora_weights loads the Lightning LoRA through it",
    "accelerate": "diffusers and transformers place and quantize weights with it",
    "bitsandbytes": "diffusers' BitsAndBytesConfig (nf4/int8 editor) runs on it",
    "xatlas": "hy3dgen's paint pipeline unwraps the mesh with it, without declaring it",
    "pytest-asyncio": "a pytest plugin (asyncio_mode = auto)",
    "ruff": "the lint command",
}
IMPORT_LINE = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)|importorskip\(\"(\w+)\"",
                         re.MULTILINE)


@dataclass(frozen=True)
class Resolution:
    report: dict
    pip_output: str

    def distributions(self) -> dict[str, dict]:
        return {canonicalize_name(item["metadata"]["name"]): item
                for item in self.report["install"]}

    def install_set(self, extras: set[str]) -> dict[str, str]:
        """Name -> version of what ``atelier3d[extras]`` installs: the closure of its extras."""
        dists = self.distributions()
        environment = self.report["environment"]
        wanted: dict[str, set[str]] = {}
        todo = [("atelier3d", set(extras))]
        while todo:
            name, name_extras = todo.pop()
            if name in wanted and name_extras <= wanted[name]:
                continue
            wanted.setdefault(name, set()).update(name_extras)
            for line in dists[name]["metadata"].get("requires_dist", []):
                requirement = Requirement(line)
                if requirement.marker and not any(
                        requirement.marker.evaluate({**environment, "extra": extra})
                        for extra in wanted[name] | {""}):
                    continue
                todo.append((canonicalize_name(requirement.name), set(requirement.extras)))
        return {name: dists[name]["metadata"]["version"] for name in wanted}

    def declared(self) -> list[Requirement]:
        """atelier3d's own requirements, every extra's."""
        return [Requirement(line)
                for line in self.distributions()["atelier3d"]["metadata"]["requires_dist"]]


def copy_sources(dest: Path) -> Path:
    """What a build of the package reads, copied: pip's build writes egg-info beside it."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "atelier3d", dest / "atelier3d",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def resolution(tmp_path_factory: pytest.TempPathFactory) -> Resolution:
    tmp = tmp_path_factory.mktemp("resolve")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, str(HY3DGEN_WHEEL), str(wheels)], check=True,
                   capture_output=True)
    report = tmp / "report.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--use-feature=fast-deps", "--report", str(report), "-c", str(CONSTRAINTS),
         "--find-links", str(wheels), f"{copy_sources(tmp / 'src')}[server,cpu,gpu]"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    logger.info("resolved .[server,cpu,gpu] in %.1f s", time.monotonic() - started)
    return Resolution(json.loads(report.read_text()), done.stdout)


@pytest.mark.parametrize(("extras", "ort"), [({"server", "cpu"}, "onnxruntime"),
                                             ({"server", "gpu"}, "onnxruntime-gpu")],
                         ids=["cpu", "gpu"])
def test_server_set_has_one_ort_and_one_opencv(resolution: Resolution, extras: set[str],
                                               ort: str) -> None:
    installed = resolution.install_set(extras)
    assert ORT_BUILDS & set(installed) == {ort}
    assert OPENCV_BUILDS & set(installed) == {"opencv-python-headless"}
    assert "peft" in installed
    assert ("bitsandbytes" in installed) == ("gpu" in extras)
    # The rebuilt hy3dgen, whose requirements name neither onnxruntime nor opencv-python.
    assert installed["hy3dgen"] == "2.0.2+atelier3d.1"
    assert SERVER_ONLY <= set(installed)


def test_no_large_download(resolution: Resolution) -> None:
    """Metadata only: pip downloaded no wheel of 10 MB or more (onnxruntime-gpu is 256 MB)."""
    downloads = re.findall(r"Downloading (\S+) \(([\d.]+) (kB|MB|GB)\)", resolution.pip_output)
    large = [(name, size, unit) for name, size, unit in downloads
             if unit == "GB" or (unit == "MB" and float(size) >= 10)]
    assert large == []


def test_client_set_is_light(resolution: Resolution) -> None:
    installed = resolution.install_set(set())
    assert {"httpx", "pydantic", "numpy", "pycocotools"} <= set(installed)
    assert not (SERVER_ONLY | ORT_BUILDS | OPENCV_BUILDS | {"torchvision"}) & set(installed)


def test_every_declared_dependency_is_used(resolution: Resolution) -> None:
    imported = set()
    for folder in ("atelier3d", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in IMPORT_LINE.finditer(path.read_text()):
                imported.add(match.group(1) or match.group(2))
    unused = []
    for requirement in resolution.declared():
        name = canonicalize_name(requirement.name)
        if name == "atelier3d" or name in USED_WITHOUT_IMPORT:
            continue
        if IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported:
            unused.append(name)
    assert unused == []
    assert "prometheus-client" not in {canonicalize_name(r.name) for r in resolution.declared()}


def test_dev_venv_pip_check() -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_client_imports_without_torch_ray_or_gradio(tmp_path: Path) -> None:
    """The base set alone, installed into a new venv from a copy of the sources."""
    source = copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.monotonic()
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    logger.info("client set installed in %.1f s", time.monotonic() - started)
    probe = ("import importlib.util, json, sys\n"
             "import atelier3d.api, atelier3d.clients\n"
             "heavy = ['torch', 'ray', 'gradio', 'fastapi', 'onnxruntime', 'cv2']\n"
             "print(json.dumps({'loaded': sorted(set(heavy) & set(sys.modules)),\n"
             "                  'installed': [m for m in heavy if importlib.util.find_spec(m)]}))")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout) == {"loaded": [], "installed": []}
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True,
                           env=env)
    assert check.returncode == 0, check.stdout
