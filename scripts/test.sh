#!/usr/bin/env bash
# The test suite (CPU; GPU-marked tests skip without CUDA). Extra args go to pytest.
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
