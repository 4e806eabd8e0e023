#!/usr/bin/env bash
# The real PACS for the PACS tests and `make pacs`: Debian's Orthanc, its DICOMweb plugin and
# dcmtk (storescu, for the C-STORE receiver test). Installed with apt-get only when missing
# (needs root or sudo then).
set -euo pipefail
missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
dpkg -s orthanc-dicomweb >/dev/null 2>&1 || missing+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
[ "${#missing[@]}" -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# If the package also starts a system Orthanc on 8042/4242, scripts/pacs.sh picks free ports instead.
