#!/usr/bin/env bash
# Create .venv with the pinned CPU stack (requirements-lock.txt) and pxpo in editable mode.
# Idempotent: does nothing when .venv already matches the lock file and pyproject.toml.
# No --compile-bytecode: compiling the whole stack took ~160 of 193 s of a fresh setup here; the
# modules pxpo imports compile on first import instead (a few seconds, once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.pxpo-setup-$(cat requirements-lock.txt pyproject.toml requirements-labelstudio.txt | sha256sum | cut -c1-16)
# label-studio-sdk's brush codec without its dependencies (why: requirements-labelstudio.txt)
nodeps=$(sed -n 's/^# pxpo-nodeps: //p' requirements-labelstudio.txt)
if [ -f "$stamp" ]; then exit 0; fi
links=()
# torch==2.13.0 CPU wheel shipped on this kind of machine; elsewhere PyPI serves it.
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
if ! command -v uv >/dev/null; then "$PY" -m pip install -q uv >/dev/null 2>&1 || true; fi
if command -v uv >/dev/null; then
  uv venv -q --allow-existing -p "$PY" .venv
  VIRTUAL_ENV=.venv uv pip install -q "${links[@]}" -r requirements-lock.txt
  VIRTUAL_ENV=.venv uv pip install -q --no-deps -e .
  VIRTUAL_ENV=.venv uv pip install -q --no-deps $nodeps
else
  "$PY" -m venv .venv
  .venv/bin/pip install -q "${links[@]}" -r requirements-lock.txt
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/pip install -q --no-deps $nodeps
fi
rm -f .venv/.pxpo-setup-*
touch "$stamp"
echo "environment ready: .venv"
