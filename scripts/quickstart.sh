#!/usr/bin/env bash
# The main job on the embedded default: set up, build + pretrain the tiny model
# (cached in models/base), then the whole Kubeflow pipeline locally (kfp.local):
# prepare -> sample -> label -> train (x pipeline.rounds) -> evaluate -> register,
# ending with an MLflow model version and a printed summary.
# `bash scripts/quickstart.sh online` runs the single-process loop (`pxpo run`) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
.venv/bin/pxpo base build --out models/base
if [ "${1:-pipeline}" = "online" ]; then
  shift
  exec .venv/bin/pxpo run --params params.yaml --no-resume "$@"
fi
exec .venv/bin/pxpo pipeline run --local --params params.yaml "$@"
