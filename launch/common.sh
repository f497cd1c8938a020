# Sourced by the launch/*.sh wrappers: where the tools are, and printing what runs.
# PYTHON overrides the interpreter (default: ./.venv/bin/python, else python3); the
# launchers are the ones installed beside it.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || command -v python3)}"
bin_dir="$(dirname "$PYTHON")"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

run() {  # print the exact command, then replace this shell with it
    printf '+'; printf ' %q' "$@"; printf '\n'
    exec "$@"
}

gpu_count() {  # GPUs on this node; 1 where there is none (one CPU rank)
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo "${n:-0}" | awk '{print ($1 > 0) ? $1 : 1}'
}

hostfile_hosts() {  # the host names of a DeepSpeed hostfile ("host slots=N" lines)
    [ -f "$1" ] || die "hostfile not found: $1 (see launch/hostfile.example)"
    grep -v '^\s*#' "$1" | awk 'NF {print $1}'
}

check_config() {
    [ -n "${1:-}" ] || die "no config given (e.g. configs/mnist32.yaml)"
    [ -f "$1" ] || die "config not found: $1"
}
