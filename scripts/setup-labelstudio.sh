#!/usr/bin/env bash
# Create .venv-labelstudio: a Label Studio server in its own environment (requirements-labelstudio.txt),
# for tests/test_label_studio.py and local labelling. Idempotent. About a minute with a warm uv cache.
# Then a migrated empty data dir for the tests' servers (.venv-labelstudio/pxpo-empty-data, ~40 s once;
# tests/labelstudio_server.py): each test server starts from a copy in seconds instead of migrating.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
pin=$(grep -E '^(label-studio|selenium)==' requirements-labelstudio.txt | tr '\n' ' ')
stamp=.venv-labelstudio/.pxpo-setup-$(echo "$pin" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ -d .venv-labelstudio/pxpo-empty-data ]; then exit 0; fi
if command -v uv >/dev/null; then
  uv venv -q --allow-existing -p "$PY" .venv-labelstudio
  VIRTUAL_ENV=.venv-labelstudio uv pip install -q $pin
else
  "$PY" -m venv .venv-labelstudio
  .venv-labelstudio/bin/pip install -q $pin
fi
rm -rf .venv-labelstudio/.pxpo-setup-* .venv-labelstudio/pxpo-empty-data
.venv-labelstudio/bin/python tests/labelstudio_server.py --template
touch "$stamp"
echo "Label Studio ready: .venv-labelstudio/bin/label-studio"
