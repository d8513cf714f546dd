#!/usr/bin/env bash
# The GPU checks of issue 9 in one shot: the CUDA test tier (tests/gpu) and bench/gpu_epoch.py.
#
# Two steps, for a session whose task is lent a GPU machine (the device tool; its README
# in the tool library says how carrying wheels works):
#
#   1. HERE, once, in the repository root (needs pip and the package index):
#        bash bench/gpu_session.sh fetch
#      downloads the wheels the GPU image lacks or has too old (diffusers, transformers,
#      tokenizers, peft, pydantic, ...; the image has torch, accelerate, huggingface_hub,
#      nvidia-ml-py) into .whl/ (about 20 MB) and adds /.whl/ to .git/info/exclude.
#   2. THERE, one call (carry: [".whl"], timeout_s 600):
#        bash bench/gpu_session.sh run
#      installs them into /tmp/site, then runs, each under its own time limit so that a
#      slow part still leaves the others' output:
#        - pytest -m gpu tests/gpu            -> $OUT/gpu_tests.log, $OUT/gpu_tests.xml
#        - bench/gpu_epoch.py (SD 1.5 shape)  -> $OUT/gpu_epoch.json, $OUT/gpu_epoch.log
#        - nvidia-smi, versions               -> $OUT/env.txt
#      Record the figures in docs/benchmarks.md ("SD-sized epoch on a GPU").
#
# Budget: device time is 15 minutes a session, the machine's start included; this run
# takes about 6-9 minutes (tier <= 170 s, epoch bench <= 390 s: fixture build, warm-up and reported
# epochs, floor), within one 10-minute call; gpu_epoch.json is written after each epoch.
set -uo pipefail

WHEELS=(
  "diffusers==0.42.1" "transformers==5.24.0" "tokenizers==0.23.3" "peft==0.21.2"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "importlib-metadata==9.1.0" "zipp==4.1.2" "regex==2026.11.19"
)

fetch() {
  local dest="${WHL_DIR:-.whl}" pip="${PIP:-python3 -m pip}"
  mkdir -p "$dest"
  if [ -d .git/info ] || [ -d .git ]; then
    mkdir -p .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  fi
  for w in "${WHEELS[@]}"; do
    $pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$w" || { echo "fetch failed: $w" >&2; return 1; }
  done
  du -sh "$dest"
}

run() {
  local out="${OUT:-/tmp/pxpo_gpu_out}"
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no .whl/: using the installed packages" >&2
    export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  {
    nvidia-smi
    python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  } > "$out/env.txt" 2>&1
  cat "$out/env.txt"

  # 1. the CUDA tier (it must not be skipped here: -rs lists any skip with its reason)
  timeout 170 python3 -m pytest -q -m gpu tests/gpu -rs -s -p no:cacheprovider --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
  echo "gpu tier exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_tests.log"

  # 2. the SD 1.5-shaped epoch (warm-up epoch + reported epoch + floor)
  timeout 390 python3 bench/gpu_epoch.py --epochs 2 --out "$out/gpu_epoch.json" 2>&1 | grep -v -E "Warning|it/s\]" | tee "$out/gpu_epoch.log"
  echo "gpu_epoch exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_epoch.log"
}

case "${1:-run}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_session.sh fetch|run" >&2; exit 2 ;;
esac
