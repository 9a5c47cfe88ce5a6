#!/usr/bin/env bash
# make test-image-gpu: make gpu-check's logic (deploy/gpu_check.py) inside the GPU image, against
# the packages the image installed (/app/.venv) and the image's own system libraries: ONNX
# Runtime's CUDA provider must resolve every library but the driver's libcuda.so.1 (mounted by
# the NVIDIA container runtime on a GPU node). Runs in a throwaway container as root, whose
# writable layer gets gpu_check.py's stamp (the venv holds exactly the bentofile's packages, so
# nothing is installed); deploy/ is mounted where the Bento's src/ has service/ and exported/.
#   deploy/image/gpu_check.sh [image]     (default deepserve-gpu:latest)
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-deepserve-gpu:latest}
src=/home/bentoml/bento/src
docker run --rm --user 0 --entrypoint bash -v "$PWD/deploy:$src/deploy:ro" "$IMAGE" -c "
  set -e
  cd $src
  python deploy/gpu_check.py --bentofile deploy/bentofile-gpu.yaml --print-packages > /app/.venv/.gpu-check-packages
  python deploy/gpu_check.py --bentofile deploy/bentofile-gpu.yaml --venv /app/.venv"
