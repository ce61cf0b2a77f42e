"""Rebuild PyPI's hy3dgen 2.0.2 wheel as 2.0.2+atelier3d.1: the same files, fewer requirements.

hy3dgen 2.0.2 requires ``onnxruntime`` and ``rembg`` (for ``hy3dgen.rembg``, its background
remover) and ``opencv-python``. atelier3d uses ``hy3dgen.shapegen`` and ``hy3dgen.texgen`` only,
and chooses the ONNX Runtime build itself (the ``cpu`` or ``gpu`` extra): with the original
metadata a GPU install holds both ``onnxruntime`` and ``onnxruntime-gpu`` (one module, the CUDA
provider can vanish) and two OpenCV builds, or fails ``pip check``. The rebuilt wheel drops
those requirements, asks for ``opencv-python-headless`` (the same ``cv2`` module) and adds
``scikit-image``, which ``hy3dgen.shapegen`` imports and used to get through rembg. Code and
every other file are byte for byte PyPI's.

    python constraints/hy3dgen_wheel.py [DEST_DIR]   # default .cache/wheels

prints the wheel's path; ``pip install --find-links DEST_DIR -c constraints/tested.txt`` then
takes it. Standard library only; pip downloads the original (checked against its sha256).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "hy3dgen"
UPSTREAM_VERSION = "2.0.2"
UPSTREAM_SHA256 = "92931c9f99ab4679b5f0475bf37ffd0822b3c0739b0feb58b76800ca7ee6df23"
VERSION = "2.0.2+atelier3d.1"
DROPPED = {"onnxruntime", "rembg", "opencv-python"}
ADDED = ["opencv-python-headless", "scikit-image"]


def download_upstream(directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "-d", str(directory), f"{NAME}=={UPSTREAM_VERSION}"],
        check=True)
    (wheel,) = directory.glob(f"{NAME}-{UPSTREAM_VERSION}-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != UPSTREAM_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {UPSTREAM_SHA256}")
    return wheel


def rewrite_metadata(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("Version: "):
            line = f"Version: {VERSION}"
        elif line.startswith("Requires-Dist: "):
            requirement = line.removeprefix("Requires-Dist: ")
            if requirement in DROPPED:
                continue
        lines.append(line)
    last_requirement = max(i for i, line in enumerate(lines) if line.startswith("Requires-Dist"))
    lines[last_requirement + 1:last_requirement + 1] = [f"Requires-Dist: {r}" for r in ADDED]
    return "\n".join(lines) + "\n"


def record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def rebuild(upstream: Path, dest: Path) -> Path:
    old_info = f"{NAME}-{UPSTREAM_VERSION}.dist-info/"
    new_info = f"{NAME}-{VERSION}.dist-info/"
    out = dest / f"{NAME}-{VERSION}-py3-none-any.whl"
    partial = out.with_suffix(".partial")
    records = []
    with zipfile.ZipFile(upstream) as src, zipfile.ZipFile(partial, "w",
                                                            zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if name == old_info + "RECORD":
                continue
            data = src.read(item)
            if name.startswith(old_info):
                name = new_info + name.removeprefix(old_info)
                if name == new_info + "METADATA":
                    data = rewrite_metadata(data.decode()).encode()
            dst.writestr(name, data, compress_type=item.compress_type)
            records.append(record_line(name, data))
        records.append(f"{new_info}RECORD,,")
        dst.writestr(new_info + "RECORD", "\n".join(records) + "\n",
                     compress_type=zipfile.ZIP_DEFLATED)
    partial.replace(out)
    return out


def main(argv: list[str]) -> int:
    dest = Path(argv[0] if argv else ".cache/wheels")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{NAME}-{VERSION}-py3-none-any.whl"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            rebuild(download_upstream(Path(tmp)), dest)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
