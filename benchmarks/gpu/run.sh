#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (Python 3.12, torch 2.11, no network, no
# Prefect/Great Expectations/DVC/pydantic/pydicom). Writes $OUT/gpu.json (else benchmarks/results/gpu.json).
#
# Here, once (the wheels are git-ignored; the device tool carries them):
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d benchmarks/gpu/wheels -r benchmarks/gpu/wheels.txt
# There (device tool: carry ["benchmarks/gpu/wheels"], timeout_s 540):
#   bash benchmarks/gpu/run.sh
# Extra arguments go to gpu_check.py (e.g. --device cpu --tiny for a dry run with PYTHON=.venv/bin/python
# where the wheels' Python matches).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
wheels=benchmarks/gpu/wheels
want=$(grep -cvE '^\s*(#|$)' benchmarks/gpu/wheels.txt)
have=$(ls "$wheels"/*.whl 2>/dev/null | wc -l)
if [ "$have" -lt "$want" ]; then
  echo "run.sh: $wheels holds $have wheels, wheels.txt lists $want; download them first (see this script's header)" >&2
  exit 2
fi
site=$(mktemp -d /tmp/cxr-gpu-site.XXXXXX)
trap 'rm -rf "$site"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
"$PY" -c 'import torch, torchvision, numpy, pydantic, isal; print("run.sh: torch", torch.__version__, "cuda", torch.cuda.is_available())'
# 8 minutes at most, so a 10-minute device call always returns the JSON written so far.
exec timeout 480 "$PY" benchmarks/gpu/gpu_check.py --out "$out" "$@"
