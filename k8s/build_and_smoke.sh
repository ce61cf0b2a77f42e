#!/usr/bin/env bash
# Builds the image (k8s/Dockerfile) and smoke-tests it: inside a container of it, tiny
# checkpoints (`atelier3d models make-tiny`), `atelier3d serve --models tiny`, /readyz green with
# every model deployment, then a SIGTERM that stops the server (k8s/smoke.py). Run from anywhere:
#   bash k8s/build_and_smoke.sh                 # TAG=atelier3d:smoke by default
#   TAG=<registry>/atelier3d:0.1.0 GPUS=all bash k8s/build_and_smoke.sh   # smoke on the GPUs
# Exits 2, saying why, where Docker is missing or its daemon does not answer.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-atelier3d:smoke}

if ! command -v docker >/dev/null 2>&1; then
  echo "build_and_smoke: docker is not installed on this machine: the image cannot be built" \
       "or smoke-tested here (run this where Docker is)" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "build_and_smoke: docker is installed but no Docker daemon answers" \
       "(\`docker info\` fails${DOCKER_HOST:+ for DOCKER_HOST=$DOCKER_HOST}): the image cannot be" \
       "built or smoke-tested here (start the daemon, or run this where one runs)" >&2
  exit 2
fi

docker build -f k8s/Dockerfile -t "$TAG" .
echo "build_and_smoke: built $TAG; smoke test (tiny models)..."
docker run --rm ${GPUS:+--gpus "$GPUS"} -e ATELIER3D_HOME=/tmp/atelier3d \
  -v "$PWD/k8s/smoke.py:/tmp/smoke.py:ro" "$TAG" python /tmp/smoke.py
echo "build_and_smoke: $TAG passed its smoke test"
