#!/usr/bin/env bash
# Start a local Prefect server (127.0.0.1, SQLite under $PREFECT_HOME) and wait until it answers.
#   scripts/prefect-server.sh start       background; prints the API URL; pid in $PREFECT_HOME/server.pid
#   scripts/prefect-server.sh stop
#   scripts/prefect-server.sh foreground  for `make ui`
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# Automations (the nightly failure alert, flows/alerts.py) need the server's event services:
# on by default in Prefect 3, said here so that a profile turning them off does not silence it.
export PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=true PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED=true
PORT="${CXR_PREFECT_PORT:-4200}"
HOST=127.0.0.1
# The UI's browser code calls this URL; without it the UI assumes port 4200.
export PREFECT_UI_API_URL="http://$HOST:$PORT/api"
# Links in automation notices (the nightly alert's "url") point at this UI.
export PREFECT_UI_URL="http://$HOST:$PORT"
PREFECT=".venv/bin/prefect"
mkdir -p "$PREFECT_HOME"
pidfile="$PREFECT_HOME/server.pid"

case "${1:-start}" in
  foreground)
    echo "Prefect UI: http://$HOST:$PORT  (set PREFECT_API_URL=http://$HOST:$PORT/api for runs)"
    exec "$PREFECT" server start --host "$HOST" --port "$PORT"
    ;;
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "http://$HOST:$PORT/api"; exit 0
    fi
    # setsid: the server gets its own process group, so `stop` ends uvicorn's children too.
    setsid "$PREFECT" server start --host "$HOST" --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 120); do
      if curl -fsS "http://$HOST:$PORT/api/health" >/dev/null 2>&1; then
        echo "http://$HOST:$PORT/api"; exit 0
      fi
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then break; fi
      sleep 0.5
    done
    echo "Prefect server did not start; its log:" >&2
    tail -n 30 "$PREFECT_HOME/server.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      kill -- -"$(cat "$pidfile")" 2>/dev/null || kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    ;;
  *) echo "usage: $0 start|stop|foreground" >&2; exit 2 ;;
esac
