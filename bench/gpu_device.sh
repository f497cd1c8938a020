#!/usr/bin/env bash
# The GPU check on a lent device machine, as one prepared step (see bench/gpu_train_check.py).
# The device image has torch but none of deepspeed, webdataset, pydantic or hjson, and no
# package registry: they travel as wheels in .whl/ (git-ignored, about 5 MB).
#
#   bash bench/gpu_device.sh wheels   # here, once: fill .whl/ with Python 3.12 wheels
#   bash bench/gpu_device.sh run      # there (the device tool's run, carry [".whl"]): install
#                                     # them in /tmp/site and run the check (about 3 minutes)
#
# The check's output and its JSON line also go to $OUT/gpu_train_check.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
wheels)
    python="${PYTHON:-.venv/bin/python}"
    rm -rf .whl && mkdir -p .whl
    # DeepSpeed publishes an sdist only: its wheel is pure Python (ops compile where they run).
    "$python" -m pip wheel -q --no-deps -w .whl "deepspeed==0.19.8"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "webdataset==1.0.2" "braceexpand==0.1.7" "pydantic==2.14.4" "pydantic-core==2.50.5" \
        "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing-extensions==4.16.0" "hjson==3.1.0"
    du -sh .whl && ls .whl
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    log="${OUT:-/tmp}/gpu_train_check.log"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
    timeout 280 python3 bench/gpu_train_check.py "${@:2}" 2>&1 | tee -a "$log"
    ;;
*)
    echo "usage: bash bench/gpu_device.sh wheels|run [gpu_train_check.py options]" >&2
    exit 2
    ;;
esac
