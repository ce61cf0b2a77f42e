#!/usr/bin/env bash
# One device call: installs what prepare.sh carried, then SAM, the editor and 3D in turn, each
# under its own time limit so one slow part cannot take the others' time. JSON lands in $OUT.
# The whole-app journey (journey.py: full-size weights written, loaded twice, served) needs a
# device call of its own: JOURNEY_ONLY=1 runs it alone under JOURNEY_S (default 540 s); without
# it, the journey runs last with whatever the budget has left (usually nothing).
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
if [[ -z ${DRY_RUN:-} ]]; then  # DRY_RUN=1: a checkout's own environment, the CPU, tiny models
  mkdir -p /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpu/wheels/*.whl || exit 1
  tar xJf .gpu/bnb.tar.xz -C /tmp/site && tar xJf .gpu/pymeshlab.tar.xz -C /tmp/site || exit 1
  for deb in .gpu/debs/*.deb; do dpkg -x "$deb" /tmp/gl || exit 1; done
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "install: $((SECONDS - start)) s"
budget=${BUDGET_S:-560}
run() {  # run NAME LIMIT_S ARGS...: at most LIMIT_S, and never past the call's budget
  local left=$((budget - (SECONDS - start))) limit=$2
  ((left < limit)) && limit=$left
  ((limit < 20)) && { echo "$1: skipped, ${left} s left"; return; }
  echo "== $1 (limit ${limit} s)"
  timeout -k 5 "$limit" python3 "benchmarks/gpu/$1.py" "${@:3}" ${DRY_RUN:+--dry-run} \
    > "$OUT/$1.log" 2>&1
  echo "$1: exit $? after $((SECONDS - start)) s"
  grep -v '^  "\|^    \|^[]{}]\|Warn\|warn' "$OUT/$1.log" | tail -25  # not the JSON dumps
}
gl=/tmp/gl/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [[ -z ${JOURNEY_ONLY:-} ]]; then
  run sam_gpu "${SAM_S:-110}"
  run edit_gpu "${EDIT_S:-200}"
  LD_LIBRARY_PATH=$gl run mesh_gpu 400 --budget-s "${MESH_BUDGET_S:-150}"
fi
# The served app imports Ray Serve, FastAPI, Gradio, OpenCV and LiteRT, which the bare GPU image
# may lack and which are too large to carry (Ray's wheel alone is 79 MB): say which are missing
# rather than spend the call failing on the first one.
missing=$(python3 - <<'PY'
import importlib.util
modules = ["ray.serve", "fastapi", "uvicorn", "httpx", "multipart", "gradio", "cv2",
           "ai_edge_litert", "onnxruntime", "onnx", "peft", "fast_simplification", "skimage"]
print(" ".join(m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None))
PY
)
if [[ -n $missing ]]; then
  echo "journey: skipped, this image lacks: $missing"
else
  # full-size weights (~64 GB) go to the largest scratch space; they are written once per machine
  pose=(); [[ -d .gpu/pose ]] && pose=(--pose .gpu/pose)  # BlazePose's models, carried
  LD_LIBRARY_PATH=$gl run journey "${JOURNEY_S:-540}" \
    --weights-dir "${JOURNEY_WEIGHTS:-/tmp/journey-weights}" "${pose[@]}"
fi
[[ -n ${DRY_RUN:-} ]] || nvidia-smi --query-gpu=memory.used --format=csv,noheader
