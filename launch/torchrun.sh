#!/usr/bin/env bash
# torchrun instead of the DeepSpeed launcher (static rendezvous; run once per node).
#   bash launch/torchrun.sh [--nodes N --node-rank R --master-addr HOST] [--gpus G] CONFIG [KEY=VALUE ...]
# One node by default. Prints the command it runs:
#   torchrun --nnodes N --node_rank R --nproc_per_node G --master_addr HOST --master_port P -m pipeline train ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
nodes=1 node_rank=0 master="${MASTER_ADDR:-127.0.0.1}" gpus="$(gpu_count)"
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --node-rank) node_rank="$2"; shift 2 ;;
        --master-addr) master="$2"; shift 2 ;;
        --gpus) gpus="$2"; shift 2 ;;
        *) break ;;
    esac
done
[ "$node_rank" -lt "$nodes" ] || die "--node-rank $node_rank but --nodes $nodes"
[ "$nodes" = 1 ] || [ -n "${MASTER_PORT:-}" ] || die "several nodes: set MASTER_PORT (the same on every node)"
check_config "${1:-}"
config="$1"; shift
port="${MASTER_PORT:-$("$PYTHON" -c 'from pipeline.dist import free_port; print(free_port())')}"
run "$bin_dir/torchrun" --nnodes "$nodes" --node_rank "$node_rank" --nproc_per_node "$gpus" \
    --master_addr "$master" --master_port "$port" -m pipeline train --config "$config" "$@"
