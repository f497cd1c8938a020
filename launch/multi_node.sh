#!/usr/bin/env bash
# Many nodes from one command, through the DeepSpeed launcher over pdsh/ssh (passwordless
# ssh to every host, pdsh installed, the same repository path and venv on every node).
#   bash launch/multi_node.sh --hostfile launch/hostfile [--nodes N] CONFIG [KEY=VALUE ...]
# The first host of the hostfile is the master. Environment variables reach the remote ranks
# only if DeepSpeed exports them: MLFLOW*, NCCL*, PYTHON* and those listed in ./.deepspeed_env.
# Prints the command it runs:
#   deepspeed --hostfile H --num_nodes N --master_addr FIRST --master_port P --module pipeline train ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
hostfile="" nodes=""
while [ $# -gt 0 ]; do
    case "$1" in
        --hostfile) hostfile="$2"; shift 2 ;;
        --nodes) nodes="$2"; shift 2 ;;
        *) break ;;
    esac
done
[ -n "$hostfile" ] || die "--hostfile FILE is required (see launch/hostfile.example)"
mapfile -t hosts < <(hostfile_hosts "$hostfile")
[ "${#hosts[@]}" -gt 0 ] || die "hostfile $hostfile lists no hosts"
nodes="${nodes:-${#hosts[@]}}"
[ "$nodes" -le "${#hosts[@]}" ] || die "--nodes $nodes but hostfile $hostfile lists ${#hosts[@]} host(s)"
check_config "${1:-}"
config="$1"; shift
run "$bin_dir/deepspeed" --hostfile "$hostfile" --num_nodes "$nodes" --master_addr "${MASTER_ADDR:-${hosts[0]}}" \
    --master_port "${MASTER_PORT:-29500}" --module pipeline train --config "$config" "$@"
