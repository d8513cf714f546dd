#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then the whole Kubeflow pipeline locally (kfp.local):
# prepare -> sample -> label -> train (x pipeline.rounds) -> evaluate -> register, ending with an MLflow
# model version and a printed summary: the trained reward, the held-out reward and the gold reward
# (prompt fidelity: evaluate.gold) of base and policy, and the promotion decision
# (register.max_gold_drop refuses a policy that lost the prompted digit).
# The base model is the versioned build in models/base (`pxpo base build` reuses it; --force rebuilds it).
# Extra arguments are config overrides: `bash scripts/quickstart.sh train.kl_coef=0` trains without the KL.
# `bash scripts/quickstart.sh online` runs the single-process loop (`pxpo run`) instead,
# then `pxpo evaluate` (held-out reward and gold reward, base vs policy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
# Every kfp.local task is a new Python process importing torch/diffusers/mlflow: with bytecode writing
# off (some shells export PYTHONDONTWRITEBYTECODE=1) each one compiles them again (~13 CPU-s a process).
unset PYTHONDONTWRITEBYTECODE
.venv/bin/pxpo base build --out models/base
if [ "${1:-pipeline}" = "online" ]; then
  shift
  .venv/bin/pxpo run --params params.yaml --no-resume "$@"
  out=$(.venv/bin/python -c 'import sys; from pxpo.config import load_config; print(load_config("params.yaml", sys.argv[1:]).output_dir)' "$@")
  exec .venv/bin/pxpo evaluate --params params.yaml --policy "$out" --out "$out/evaluation" "$@"
fi
exec .venv/bin/pxpo pipeline run --local --params params.yaml "$@"
