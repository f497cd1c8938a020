#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole suite (the README's test command).
# The browser test needs Debian's chromium: installed here when running as root with apt
# (CI); elsewhere that one test skips, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "run.sh: installing Debian's chromium for the MLflow UI browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash launch/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
