#!/usr/bin/env bash
# Creates .venv/ with everything csgr_distill needs, following the verified install route:
#   torch + torchvision from PyPI (the CUDA build also runs on the CPU),
#   detectron2 from the sal-detectron2 wheel (upstream commit a59f0563) without its prebuilt _C,
#   python-detr with --no-deps, then this project in editable mode.
# Idempotent: a second run with unchanged pins installs nothing (stamp file in .venv/).
# A detectron2 that already imports in the venv (e.g. built from source) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
D2_WHEEL="sal-detectron2==0.7.2"
DETR_WHEEL="python-detr==0.1.7"
stamp_key=$(cat requirements.txt setup.py scripts/setup_env.sh | sha1sum | cut -c1-12)
STAMP="$VENV/.csgr-setup-$stamp_key"
if [ -f "$STAMP" ]; then
  echo "[setup] .venv is up to date ($STAMP); nothing to install."
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check -r requirements.txt
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VPY" -c 'import detectron2.modeling' 2>/dev/null; then
  tmp=$(mktemp -d)
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.10 --target "$tmp" "$D2_WHEEL"
  rm -rf "$SITE/detectron2"
  cp -r "$tmp/detectron2" "$SITE/detectron2"
  # The wheel's _C is built for another Python/torch; without it detectron2 uses its Python paths.
  find "$SITE/detectron2" -maxdepth 1 -name '_C*.so' -delete
  rm -rf "$tmp"
fi
"$VPY" -c 'import detr' 2>/dev/null || \
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps "$DETR_WHEEL"
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$VPY" -c 'import detectron2, detr, csgr_distill, torch, torchvision; print("[setup] ok: torch", torch.__version__, "| detectron2", detectron2.__version__)'
rm -f "$VENV"/.csgr-setup-*
touch "$STAMP"
