#!/usr/bin/env bash
# Create .venv-labelstudio: a Label Studio server in its own environment (requirements-labelstudio.txt),
# for tests/test_label_studio.py and local labelling. Idempotent. About a minute with a warm uv cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
pin=$(grep -E '^(label-studio|selenium)==' requirements-labelstudio.txt | tr '\n' ' ')
stamp=.venv-labelstudio/.pxpo-setup-$(echo "$pin" | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
if command -v uv >/dev/null; then
  uv venv -q --allow-existing -p "$PY" .venv-labelstudio
  VIRTUAL_ENV=.venv-labelstudio uv pip install -q $pin
else
  "$PY" -m venv .venv-labelstudio
  .venv-labelstudio/bin/pip install -q $pin
fi
rm -f .venv-labelstudio/.pxpo-setup-*
touch "$stamp"
echo "Label Studio ready: .venv-labelstudio/bin/label-studio"
