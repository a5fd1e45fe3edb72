#!/usr/bin/env bash
# GPU readiness check (< 5 minutes): writes one JSON of GPU figures (scripts/gpu_check.py says which).
#
# Runs on a bare, offline Linux machine with NVIDIA GPUs that has python3 with CUDA torch,
# sentence-transformers, pyarrow, numpy, scipy and matplotlib. Everything else travels with the
# checkout in the git-ignored carry folder .whl/ (<= 60 MB; fill it here with `make gpu-prep`):
# wheels of evalkit's other dependencies, the default model as float16 safetensors, real texts.
#
#   bash scripts/gpu_check.sh [--out gpu_check.json]     on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                  here, on CPU: the same commands, tiny
#
# --dry-run checks the carried files (sizes, SHA-256, total, dependency coverage), installs the
# wheels for CPython 3.12 manylinux into a scratch folder (as the GPU machine will), and runs every
# step tiny on CPU with this machine's interpreter (PYTHON=..., default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
CARRY="${EVALKIT_CARRY:-.whl}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f "$CARRY/CARRY.json" ]; then
  echo "gpu_check: no $CARRY/CARRY.json; run \`make gpu-prep\` (with network) before copying the checkout" >&2
  exit 1
fi
SITE="$(mktemp -d)/site"
if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-.venv/bin/python}"
  [ -x "$PY" ] || PY=python3
  # the GPU machine's interpreter: install exactly as it will, without loading the cp312 builds here
  "$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --target "$SITE" "$CARRY"/wheels/*.whl
  ls "$SITE" | grep -q '^diskcache$' || { echo "gpu_check: wheels did not install" >&2; exit 1; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  exec timeout 1200 "$PY" scripts/gpu_check.py --carry "$CARRY" --out "$OUT" --dry-run
fi
PY="${PYTHON:-python3}"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/wheels/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 290 "$PY" scripts/gpu_check.py --carry "$CARRY" --out "$OUT"
