# Sourced by the slurm/*.sbatch scripts inside the allocation (the batch step, on the first
# node). Sets the rendezvous for srun's tasks and runs one task per GPU (or CPU rank).
#
# Rank mapping (pipeline/dist.py): SLURM_PROCID -> RANK, SLURM_NTASKS -> WORLD_SIZE,
# SLURM_LOCALID -> LOCAL_RANK, SLURM_NODEID -> node rank. DeepSpeed reads no SLURM_*
# variable, so our code maps them before DeepSpeed initialises.

die() { echo "slurm: error: $*" >&2; exit 2; }

task_count() {
    # The tasks this allocation runs. A requeued job may come back on another node count
    # (sbatch --nodes=MIN-MAX, or `scontrol update` while it is held), but its saved
    # environment keeps the first start's SLURM_NTASKS: with --ntasks-per-node and whole
    # nodes' worth of tasks, the count follows the nodes actually given. (Any other count is
    # kept, for pipeline/dist.py to refuse tasks spread unevenly over nodes.)
    local per_node="${SLURM_NTASKS_PER_NODE:-}"
    if [ -n "$per_node" ] && [ $((SLURM_NTASKS % per_node)) = 0 ]; then
        echo $((SLURM_JOB_NUM_NODES * per_node))
    else
        echo "$SLURM_NTASKS"
    fi
}

pipeline_setup() {
    root="${PIPELINE_ROOT:-$SLURM_SUBMIT_DIR}"
    [ -f "$root/pipeline/__init__.py" ] || die "$root is not the repository: submit from its root or set PIPELINE_ROOT"
    cd "$root"
    PYTHON="${PYTHON:-$root/.venv/bin/python}"
    [ -x "$PYTHON" ] || die "no python at $PYTHON: run launch/setup.sh on the cluster or set PYTHON"
    # The first node's address as Slurm knows it (NodeAddr): its name may not resolve.
    local first
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show node -o "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}"
    [ -n "$MASTER_ADDR" ] || die "could not read NodeAddr of $first from scontrol"
    # One port per job id: two jobs on the same first node do not collide.
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    # Set PIPELINE_EXPECT_NODES when submitting to have a job stop at once if the allocation has
    # another node count (e.g. with --nodes=MIN-MAX); dist.py checks it on every rank.
    export PIPELINE_EXPECT_NODES="${PIPELINE_EXPECT_NODES:-$SLURM_JOB_NUM_NODES}"
    # NCCL: report errors instead of hanging on a dead peer; WARN logs are short. On clusters
    # with several NICs, set NCCL_SOCKET_IFNAME (e.g. ib0 or eth0) and NCCL_IB_HCA in the
    # environment you submit from; sbatch passes the environment through (--export=ALL).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    echo "slurm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) $(date -u +%FT%TZ): ${SLURM_JOB_NUM_NODES} node(s) [${SLURM_JOB_NODELIST}], $(task_count) task(s), master ${MASTER_ADDR}:${MASTER_PORT}, tracking ${MLFLOW_TRACKING_URI:-<config/default>}" | sed -E 's#//[^/@]*:[^/@]*@#//***@#'
}

run_tasks() {
    # One task per GPU/rank. --wait: once any rank has exited (a crash, OOM, a kill), the
    # others are killed after PIPELINE_SRUN_WAIT seconds (default 60) if they have not
    # exited by themselves: nothing waits for the wall time. (Not --kill-on-bad-exit: the
    # ranks exit 75 together after a preemption checkpoint and rank 0 must finish logging.)
    # srun runs in the background so that a SIGTERM to this batch shell (preemption) is
    # trapped and the ranks can finish their checkpoint before the script returns.
    trap 'echo "slurm: batch shell got SIGTERM; waiting for the ranks to checkpoint"' TERM
    srun --ntasks "$(task_count)" --kill-on-bad-exit=0 --wait="${PIPELINE_SRUN_WAIT:-60}" --label \
        "$PYTHON" -u -m pipeline "$@" &
    local pid=$! rc=0
    while true; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait was interrupted by the trap: wait again
    done
    trap - TERM
    return "$rc"
}

train_or_requeue() {
    # `train ... --resume auto`: the requeued job (same job id, same run folder) continues
    # from the newest checkpoint and the same MLflow run. Exit 75 = "checkpointed after a
    # preemption or time-limit signal": requeue. 0 = finished: no requeue. Anything else:
    # fail with that status.
    local rc=0
    run_tasks train "$@" --resume auto || rc=$?
    if [ "$rc" = 75 ]; then
        echo "slurm: ranks checkpointed and exited 75 at $(date -u +%FT%TZ): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed (was the job submitted with --requeue?)"
        sleep 60  # the requeue ends this script; bounded in case it does not
        exit 75
    fi
    echo "slurm: training exited $rc at $(date -u +%FT%TZ)"
    return "$rc"
}
