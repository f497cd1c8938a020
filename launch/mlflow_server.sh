#!/usr/bin/env bash
# Start a team MLflow tracking server with lean settings (1 worker, no job execution:
# ~12 s to start, ~0.5 GB), bound to localhost unless you say otherwise.
#
#   bash launch/mlflow_server.sh [--backend-store-uri URI] [--artifacts-destination DIR]
#                                [--host 127.0.0.1] [--port 5000] [--allowed-hosts HOSTS]
#
#   backend store: sqlite:///PATH/mlflow.db (default: ./mlflow-server/mlflow.db) or
#                  postgresql://USER@HOST:5432/DB (pass the password in PGPASSWORD, not the URI)
#   jobs then use: export MLFLOW_TRACKING_URI=http://HOST:PORT   (or tracking.uri in the config)
#
# Binding to a non-local address (--host 0.0.0.0) exposes the server to the network; MLflow's
# host check then needs --allowed-hosts with the names jobs use (e.g. "login01,login01:5000").
set -euo pipefail
cd "$(dirname "$0")/.."
store="sqlite:///$PWD/mlflow-server/mlflow.db"
artifacts="$PWD/mlflow-server/artifacts"
host="127.0.0.1"
port="5000"
allowed=""
while [ $# -gt 0 ]; do
    case "$1" in
        --backend-store-uri) store="$2"; shift 2 ;;
        --artifacts-destination) artifacts="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --allowed-hosts) allowed="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "mlflow_server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$store" in sqlite:///*) mkdir -p "$(dirname "${store#sqlite:///}")" ;; esac
mkdir -p "$artifacts"
mlflow_bin="${MLFLOW_BIN:-$( [ -x .venv/bin/mlflow ] && echo .venv/bin/mlflow || echo mlflow )}"
cmd=("$mlflow_bin" server --workers 1 --backend-store-uri "$store" --artifacts-destination "$artifacts"
     --host "$host" --port "$port")
[ -n "$allowed" ] && cmd+=(--allowed-hosts "$allowed")
echo "mlflow_server.sh: ${cmd[*]}" | sed -E 's#://[^/@]+@#://***@#'
echo "mlflow_server.sh: jobs use MLFLOW_TRACKING_URI=http://$host:$port"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "${cmd[@]}"
