#!/usr/bin/env bash
# The test suite (CPU; GPU-marked tests skip without CUDA), on 2+ workers (pytest-xdist). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The real-Label-Studio tests (marker labelstudio) start a server from its own env (.venv-labelstudio):
# created here by default (seconds with a warm uv cache; ~50 s of tests). PXPO_LABEL_STUDIO=0 skips it.
# The browser test of the labelling page also needs Debian's chromium and chromium-driver.
# Outside CI, a missing env or chromium is a warning and those tests are reported as skipped (with the reason).
# Under CI=true (.ci/run) nothing may be skipped for want of it: chromium is installed here when missing
# (apt-get, as root or with sudo), a failure to create the env or to install chromium fails the run, and the
# tests fail rather than skip when their prerequisites are missing (tests/prereq.py).
ci=false
case "${CI:-}" in true | TRUE | True | 1 | yes) ci=true ;; esac
die() { echo "ERROR (CI=true): $*" >&2; exit 1; }
if [ "${PXPO_LABEL_STUDIO:-1}" = 1 ]; then
  if ! bash scripts/setup-labelstudio.sh; then
    [ "$ci" = true ] && die "could not create .venv-labelstudio (bash scripts/setup-labelstudio.sh failed above); the Label Studio tests cannot run"
    echo "WARNING: could not create .venv-labelstudio; the labelstudio tests will be SKIPPED" >&2
  fi
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$ci" = true ]; then
    if [ "$(id -u)" = 0 ]; then
      as_root=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      as_root=(sudo -n)
    else
      die "chromium/chromedriver missing and cannot install them (not root, no password-less sudo): apt-get install -y chromium chromium-driver"
    fi
    echo "CI: installing chromium and chromium-driver (the labelling page's browser test)" >&2
    apt_install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2; }
    apt_install || { "${as_root[@]}" apt-get update -q >&2 && apt_install; } ||
      die "apt-get install -y chromium chromium-driver failed; the browser test cannot run"
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] ||
      die "chromium installed but /usr/bin/chromium or /usr/bin/chromedriver is missing"
  else
    echo "WARNING: no /usr/bin/chromium + /usr/bin/chromedriver (apt-get install chromium chromium-driver); the labelling page's browser test will be SKIPPED" >&2
  fi
fi
# pytest-xdist (requirements-lock.txt): PXPO_TEST_WORKERS processes (default: the CPU count, at most 4), each
# running whole test files (--dist loadfile: a file's module fixtures and servers are set up once), the slowest
# files first (tests/conftest.py, SLOW_FIRST); one torch thread per worker (the tiny models' ops are faster on one
# thread than on two shared ones). PXPO_TEST_WORKERS=1 runs the tests in this process, as before.
workers=${PXPO_TEST_WORKERS:-$(n=$(nproc 2>/dev/null || echo 1); echo $((n < 4 ? n : 4)))}
export TOKENIZERS_PARALLELISM=false
# Many tests start Python processes (pxpo stages, dvc repro, kfp.local tasks, torchrun workers): with
# PYTHONDONTWRITEBYTECODE set (some machines set it) and a .venv installed without bytecode (scripts/setup.sh),
# each of them would compile torch's, transformers' and diffusers' sources again (~22 s instead of ~9 s of CPU).
unset PYTHONDONTWRITEBYTECODE
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q "$@"
