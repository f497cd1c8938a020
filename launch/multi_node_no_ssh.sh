#!/usr/bin/env bash
# Many nodes without ssh: run this on every node (by hand, or from your scheduler), each with
# its own --node-rank; the DeepSpeed launcher then starts only the local ranks.
#   bash launch/multi_node_no_ssh.sh --hostfile launch/hostfile --node-rank R CONFIG [KEY=VALUE ...]
# All nodes must use the same hostfile, config and MASTER_PORT. The first host is the master.
# Prints the command it runs:
#   deepspeed --hostfile H --no_ssh --node_rank R --master_addr FIRST --master_port P --module pipeline train ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
hostfile="" node_rank=""
while [ $# -gt 0 ]; do
    case "$1" in
        --hostfile) hostfile="$2"; shift 2 ;;
        --node-rank) node_rank="$2"; shift 2 ;;
        *) break ;;
    esac
done
[ -n "$hostfile" ] || die "--hostfile FILE is required (see launch/hostfile.example)"
[ -n "$node_rank" ] || die "--node-rank R is required (0 on the master node)"
mapfile -t hosts < <(hostfile_hosts "$hostfile")
[ "$node_rank" -lt "${#hosts[@]}" ] || die "--node-rank $node_rank but hostfile $hostfile lists ${#hosts[@]} host(s)"
check_config "${1:-}"
config="$1"; shift
run "$bin_dir/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
    --master_addr "${MASTER_ADDR:-${hosts[0]}}" --master_port "${MASTER_PORT:-29500}" \
    --module pipeline train --config "$config" "$@"
