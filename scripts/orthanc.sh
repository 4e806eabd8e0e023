#!/usr/bin/env bash
# A real Orthanc PACS (Debian's orthanc + orthanc-dicomweb) on loopback, with HTTP basic auth,
# DICOMweb enabled and storage in a throwaway folder.
#
#   scripts/orthanc.sh start   -> installs the packages if missing, starts Orthanc in the
#                                 background, waits until it answers, prints its DICOMweb URL last
#   scripts/orthanc.sh stop    -> stops the Orthanc started from the same CXR_ORTHANC_DIR
#
# Env: CXR_ORTHANC_DIR (state folder; default .orthanc in the project), CXR_ORTHANC_HTTP_PORT and
# CXR_ORTHANC_DICOM_PORT (default: free ports), CXR_DICOMWEB_USER / CXR_DICOMWEB_PASSWORD (the one
# registered user; default cxr / a random password written to $CXR_ORTHANC_DIR/password, mode 600).
# The password is never printed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${CXR_ORTHANC_DIR:-$ROOT/.orthanc}"
cmd="${1:-}"

install() {
  if command -v Orthanc >/dev/null 2>&1 && dpkg -s orthanc-dicomweb >/dev/null 2>&1; then return 0; fi
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() {
  if [ -f "$DIR/orthanc.pid" ]; then
    pid="$(cat "$DIR/orthanc.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/orthanc.pid"
  fi
}

start() {
  install
  stop
  mkdir -p "$DIR/storage"
  chmod 700 "$DIR"
  http_port="${CXR_ORTHANC_HTTP_PORT:-$(free_port)}"
  dicom_port="${CXR_ORTHANC_DICOM_PORT:-$(free_port)}"
  user="${CXR_DICOMWEB_USER:-cxr}"
  password="${CXR_DICOMWEB_PASSWORD:-}"
  if [ -z "$password" ]; then
    password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')"
    (umask 077; printf '%s' "$password" > "$DIR/password")
  fi
  plugin="$(dpkg -L orthanc-dicomweb | grep -E 'libOrthancDicomWeb\.so$' | head -n1)"
  [ -n "$plugin" ] || { echo "orthanc-dicomweb plugin library not found" >&2; exit 1; }
  # The config holds the password: private to this user.
  (umask 077; USER_="$user" PASS_="$password" python3 - "$DIR" "$http_port" "$dicom_port" "$plugin" <<'PY'
import json, os, sys
d, http, dicom, plugin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = {
    "Name": "cxr-orthanc", "StorageDirectory": f"{d}/storage", "IndexDirectory": f"{d}/storage",
    "HttpServerEnabled": True, "HttpPort": http, "DicomServerEnabled": True, "DicomPort": dicom,
    "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
    "RegisteredUsers": {os.environ["USER_"]: os.environ["PASS_"]},
    "Plugins": [plugin], "HttpTimeout": 60, "StableAge": 1, "ConcurrentJobs": 2,
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{http}",
                 "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
}
with open(f"{d}/orthanc.json", "w") as f:
    json.dump(cfg, f, indent=2)
PY
  )
  nohup Orthanc "$DIR/orthanc.json" >"$DIR/orthanc.log" 2>&1 &
  echo $! > "$DIR/orthanc.pid"
  echo "$http_port" > "$DIR/http_port"; echo "$dicom_port" > "$DIR/dicom_port"
  for _ in $(seq 150); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/system" || true)"
    # 401 means it answers (and that authentication is on).
    if [ "$code" = "401" ] || [ "$code" = "200" ]; then
      echo "http://127.0.0.1:$http_port/dicom-web"
      return 0
    fi
    kill -0 "$(cat "$DIR/orthanc.pid")" 2>/dev/null || { echo "Orthanc exited; see $DIR/orthanc.log" >&2; tail -n 20 "$DIR/orthanc.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "Orthanc did not answer on 127.0.0.1:$http_port; see $DIR/orthanc.log" >&2
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
