#!/usr/bin/env bash
# The main job on the embedded default: set up, build + pretrain the tiny model
# (cached in models/base), then PXPO for train.epochs epochs with a pixel-wise reward.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
.venv/bin/pxpo base build --out models/base
.venv/bin/pxpo run --params params.yaml --no-resume "$@"
