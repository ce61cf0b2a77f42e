#!/usr/bin/env bash
# One device call: installs what prepare.sh carried, then SAM, the editor and 3D in turn, each
# under its own time limit so one slow part cannot take the others' time. JSON lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
tar xJf .gpu/bnb.tar.xz -C /tmp/site && tar xJf .gpu/pymeshlab.tar.xz -C /tmp/site || exit 1
for deb in .gpu/debs/*.deb; do dpkg -x "$deb" /tmp/gl || exit 1; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
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
run sam_gpu "${SAM_S:-110}"
run edit_gpu "${EDIT_S:-200}"
LD_LIBRARY_PATH=/tmp/gl/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
  run mesh_gpu 400 --budget-s "${MESH_BUDGET_S:-150}"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
