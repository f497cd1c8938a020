#!/usr/bin/env bash
# One node, N GPUs (or N CPU ranks), through the DeepSpeed launcher.
#   bash launch/single_node.sh [--gpus N] CONFIG [KEY=VALUE ...] [--resume auto]
# N defaults to the GPUs nvidia-smi lists (1 without GPUs). Prints the command it runs:
#   deepspeed --num_gpus N --master_port P --module pipeline train --config CONFIG ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
gpus="$(gpu_count)"
if [ "${1:-}" = "--gpus" ]; then gpus="$2"; shift 2; fi
check_config "${1:-}"
config="$1"; shift
port="${MASTER_PORT:-$("$PYTHON" -c 'from pipeline.dist import free_port; print(free_port())')}"
run "$bin_dir/deepspeed" --num_gpus "$gpus" --master_port "$port" --module pipeline train --config "$config" "$@"
