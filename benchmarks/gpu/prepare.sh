#!/usr/bin/env bash
# Builds .gpu/ (git-ignored through .git/info/exclude): the packages the lent GPU machine lacks,
# for Python 3.12 x86-64, small enough to travel (< 64 MiB with the tree). Run here, once:
#   bash benchmarks/gpu/prepare.sh
# then one device run with carry [".gpu"] and the command `bash benchmarks/gpu/run_all.sh`.
# For the whole-app journey: `JOURNEY=1 bash benchmarks/gpu/prepare.sh`, then a device run of its
# own with `JOURNEY_ONLY=1 bash benchmarks/gpu/run_all.sh` (see the end of this file).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -rf .gpu && mkdir -p .gpu/wheels
download() {  # cp312 manylinux wheels, no dependencies (each one is named)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
download .gpu/wheels diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
  typing-inspection typing-extensions segment-anything==1.0 hy3dgen==2.0.2 trimesh==5.2.0 \
  omegaconf antlr4-python3-runtime pygltflib
download "$tmp" bitsandbytes==0.50.2 pymeshlab==2023.12.post3
# bitsandbytes: only the CUDA 13 kernels (the image's torch is cu130) and the CPU ones.
unzip -q "$tmp"/bitsandbytes-*.whl -d "$tmp/bnb"
find "$tmp/bnb/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
tar cJf .gpu/bnb.tar.xz -C "$tmp/bnb" .
# pymeshlab (98 MB): hy3dgen.shapegen imports it; keep the plugins its remove_floater and
# reduce_face filters live in, drop the tests and the libraries only other plugins load.
unzip -q "$tmp"/pymeshlab-*.whl -d "$tmp/pml"
p="$tmp/pml/pymeshlab"; mv "$tmp"/pml/*.data/purelib/pymeshlab "$p"
rm -rf "$p/tests" "$p"/lib/libembree* "$p"/lib/libicu*66 "$p"/lib/libIFX* "$p"/lib/libIDTF* \
  "$p"/lib/libxerces*
find "$p/lib/plugins" -name '*.so' ! -name libfilter_clean.so ! -name libfilter_meshing.so \
  ! -name libfilter_select.so ! -name libfilter_mls.so ! -name libio_base.so -delete
tar cJf .gpu/pymeshlab.tar.xz -C "$tmp/pml" pymeshlab
# pymeshlab's Qt loads libGL and X11 client libraries, which the GPU image lacks: Debian's, unpacked
# there into a private folder (not /) and put on LD_LIBRARY_PATH for the 3D run only.
mkdir -p .gpu/debs
(cd .gpu/debs && apt-get download -q libgl1 libglvnd0 libglx0 libx11-6 libxau6 libxcb1 \
  libxdmcp6 libbsd0 libmd0)
# JOURNEY=1: what journey.py needs besides: BlazePose's models (9 MB, from the mediapipe wheel)
# and the small web stack. Not carried, too large for one transfer (64 MiB in all): Ray (its
# cp312 wheel is 79 MB), OpenCV (64 MB), Gradio (the Gateway imports it) and LiteRT; the image
# must have them (run_all.sh names what is missing and skips the journey).
if [[ -n ${JOURNEY:-} ]]; then
  download .gpu/wheels fastapi starlette uvicorn httpx httpcore h11 anyio python-multipart peft \
    fast-simplification
  PYTHONPATH=$PWD "$PY" -c "import sys; from pathlib import Path
from atelier3d.models.parse.pose import resolve_pose_weights
w = resolve_pose_weights(cache_dir=Path(sys.argv[1]))
Path('.gpu/pose').mkdir(); [Path('.gpu/pose', f.name).write_bytes(f.read_bytes())
                            for f in (w.detector, w.landmarks)]" "$tmp"
fi
du -sh .gpu
