#!/usr/bin/env bash
# The project's own PACS: Debian's Orthanc with its DICOMweb plugin, on loopback only, HTTP basic
# authentication on, storage in a project-local folder.
#
#   scripts/pacs.sh start    installs the packages if missing (scripts/install-orthanc.sh), starts
#                            Orthanc in the background, waits until it answers; prints its DICOMweb
#                            URL on the last line
#   scripts/pacs.sh stop     stops the Orthanc started from the same state folder
#   scripts/pacs.sh status   prints the URLs and the user when it runs (exit 0), else exit 3
#
# Env: CXR_PACS_DIR (state folder: config, storage, log; default .orthanc in the project),
# CXR_PACS_HTTP_PORT / CXR_PACS_DICOM_PORT (default 8042 / 4242 when free, else a free port),
# CXR_DICOMWEB_USER / CXR_DICOMWEB_PASSWORD (the one registered user; default cxr and a random
# password kept in $CXR_PACS_DIR/password, mode 600, reused on the next start).
# The password is never printed: only the file that holds it is named.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${CXR_PACS_DIR:-$ROOT/.orthanc}"
cmd="${1:-}"

port_free() {
  python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

pick_port() {  # $1: the preferred port
  if port_free "$1"; then echo "$1"; else
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  fi
}

running() {
  [ -f "$DIR/orthanc.pid" ] && kill -0 "$(cat "$DIR/orthanc.pid")" 2>/dev/null
}

stop() {
  if [ -f "$DIR/orthanc.pid" ]; then
    pid="$(cat "$DIR/orthanc.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/orthanc.pid"
  fi
}

status() {
  if running; then
    http_port="$(cat "$DIR/http_port")"
    echo "Orthanc runs (pid $(cat "$DIR/orthanc.pid")), user $(cat "$DIR/user"); storage $DIR/storage"
    echo "Orthanc Explorer: http://127.0.0.1:$http_port/app/explorer.html"
    echo "http://127.0.0.1:$http_port/dicom-web"
  else
    echo "Orthanc is not running (state folder $DIR)" >&2
    return 3
  fi
}

start() {
  "$ROOT/scripts/install-orthanc.sh"
  stop
  mkdir -p "$DIR/storage"
  chmod 700 "$DIR"
  http_port="${CXR_PACS_HTTP_PORT:-$(pick_port 8042)}"
  dicom_port="${CXR_PACS_DICOM_PORT:-$(pick_port 4242)}"
  user="${CXR_DICOMWEB_USER:-cxr}"
  password="${CXR_DICOMWEB_PASSWORD:-}"
  if [ -z "$password" ]; then
    if [ -s "$DIR/password" ]; then
      password="$(cat "$DIR/password")"
    else
      password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')"
      (umask 077; printf '%s' "$password" > "$DIR/password")
    fi
  fi
  printf '%s\n' "$user" > "$DIR/user"
  plugin="$(dpkg -L orthanc-dicomweb | grep -E 'libOrthancDicomWeb\.so$' | head -n1)"
  [ -n "$plugin" ] || { echo "the orthanc-dicomweb plugin library was not found (dpkg -L orthanc-dicomweb)" >&2; exit 1; }
  # The config holds the password: private to this user. The secrets travel in the environment
  # of the one python3 that writes it, never on a command line.
  (umask 077; USER_="$user" PASS_="$password" python3 - "$DIR" "$http_port" "$dicom_port" "$plugin" <<'PY'
import json, os, sys
d, http, dicom, plugin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = {
    "Name": "cxr-pacs", "StorageDirectory": f"{d}/storage", "IndexDirectory": f"{d}/storage",
    "HttpServerEnabled": True, "HttpPort": http, "DicomServerEnabled": True, "DicomPort": dicom,
    "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
    "RegisteredUsers": {os.environ["USER_"]: os.environ["PASS_"]},
    "Plugins": [plugin], "HttpTimeout": 60, "StableAge": 1, "ConcurrentJobs": 2, "HttpThreadsCount": 16,
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{http}",
                 "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
}
with open(f"{d}/orthanc.json", "w") as f:
    json.dump(cfg, f, indent=2)
PY
  )
  # Orthanc binds every interface, but RemoteAccessAllowed=false answers only loopback clients.
  nohup Orthanc "$DIR/orthanc.json" >"$DIR/orthanc.log" 2>&1 &
  echo $! > "$DIR/orthanc.pid"
  echo "$http_port" > "$DIR/http_port"; echo "$dicom_port" > "$DIR/dicom_port"
  for _ in $(seq 300); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/system" || true)"
    # 401 means it answers (and that authentication is on).
    if [ "$code" = "401" ] || [ "$code" = "200" ]; then
      where="$DIR/password"; [ -z "${CXR_DICOMWEB_PASSWORD:-}" ] || where="CXR_DICOMWEB_PASSWORD"
      echo "Orthanc started: user $user, password in $where; DICOM port $dicom_port, AE title ORTHANC"
      echo "Orthanc Explorer (the viewer; app.viewer_url): http://127.0.0.1:$http_port/app/explorer.html"
      [ -n "${CXR_DICOMWEB_PASSWORD:-}" ] || \
        echo "credentials for cxr: export CXR_DICOMWEB_USER=$user CXR_DICOMWEB_PASSWORD=\"\$(cat $DIR/password)\""
      echo "http://127.0.0.1:$http_port/dicom-web"
      return 0
    fi
    running || { echo "Orthanc exited; see $DIR/orthanc.log" >&2; tail -n 20 "$DIR/orthanc.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "Orthanc did not answer on 127.0.0.1:$http_port; see $DIR/orthanc.log" >&2
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
