#!/usr/bin/env bash
# The test suite (CPU; GPU-marked tests skip without CUDA). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The real-Label-Studio tests (marker labelstudio) need its own env: opt in with PXPO_LABEL_STUDIO=1 (~1 min setup, ~45 s tests).
if [ "${PXPO_LABEL_STUDIO:-0}" = 1 ]; then bash scripts/setup-labelstudio.sh; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
