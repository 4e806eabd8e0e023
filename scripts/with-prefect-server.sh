#!/usr/bin/env bash
# Run a command with one local Prefect server for all of it (a per-process ephemeral server
# costs 11-20 s at every `cxr` call), and stop the server afterwards unless one was running.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PREFECT_API_URL:-}" ]; then exec "$@"; fi
url="$(scripts/prefect-server.sh start)"
trap 'scripts/prefect-server.sh stop' EXIT
echo "Prefect server: ${url%/api} (runs are visible in its UI while this command runs)"
PREFECT_API_URL="$url" "$@"
