#!/usr/bin/env bash
# Set up .venv with the test extras, check lint and formatting (ruff), and run the whole suite
# (the README's test command).
# The browser test needs Debian's chromium and the Slurm tests Debian's slurm + munge:
# installed here when running as root with apt (CI); elsewhere those tests skip, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! command -v chromium >/dev/null 2>&1; then
        echo "run.sh: installing Debian's chromium for the MLflow UI browser test"
        timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null
    fi
    if ! command -v slurmctld >/dev/null 2>&1; then
        echo "run.sh: installing Debian's slurm and munge for the Slurm tests"
        timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
            --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
fi
bash launch/setup.sh test
# Lint and format first: a style problem fails in a second, not after the suite.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q --durations=25 "$@"
