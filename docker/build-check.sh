#!/usr/bin/env bash
# Build docker/Dockerfile.cpu without a Docker engine and run `pxpo --help` in the image.
#
#   sudo bash docker/build-check.sh   # exit 0: the image built and `pxpo` runs in it as uid 10001
#
# Also the opt-in test: PXPO_TEST_IMAGE_BUILD=1 bash scripts/test.sh tests/test_docker.py
#
# Needs root, buildah (Debian: apt-get install buildah debootstrap) and a
# reachable PyPI. Uses buildah with --isolation chroot and the vfs storage
# driver, which work inside an unprivileged container. When the base image
# python:3.11-slim-bookworm cannot be pulled (no registry), a stand-in is made
# from Debian bookworm with debootstrap (python3 in /usr/bin; the Dockerfile
# only calls `python3`) and cached in $PXPO_BUILD_CACHE (default
# ~/.cache/pxpo-build). When download.pytorch.org is unreachable, torch
# 2.13.0+cpu comes from a local wheel (/opt/wheels or $PXPO_TORCH_WHEEL_DIR)
# through a file:// simple index; its dependencies from PyPI.
# The Dockerfile itself is built unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
B=(buildah --storage-driver vfs)
BASE=docker.io/library/python:3.11-slim-bookworm
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' src/pxpo/__init__.py)
TAG=localhost/pxpo-cpu:${VERSION}-check
CACHE=${PXPO_BUILD_CACHE:-$HOME/.cache/pxpo-build}
WHEELS=${PXPO_TORCH_WHEEL_DIR:-/opt/wheels}
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

# 1. the base image: pulled, already present, or a local stand-in
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1 \
   && ! timeout 60 "${B[@]}" pull -q "$BASE" >/dev/null 2>&1; then
  if [ ! -s "$CACHE/rootfs-bookworm.tar" ]; then
    echo "== debootstrap bookworm (stand-in for $BASE)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$work/rootfs" \
      http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
    tar -C "$work/rootfs" -cf "$CACHE/rootfs-bookworm.tar.part" .
    mv "$CACHE/rootfs-bookworm.tar.part" "$CACHE/rootfs-bookworm.tar"
    rm -rf "$work/rootfs"
  fi
  mkdir "$work/base"
  ln "$CACHE/rootfs-bookworm.tar" "$work/base/rootfs.tar" 2>/dev/null || cp "$CACHE/rootfs-bookworm.tar" "$work/base/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/sh"]\n' >"$work/base/Containerfile"
  "${B[@]}" bud -q --isolation chroot -f "$work/base/Containerfile" -t "$BASE" "$work/base" >/dev/null
  echo "== base stand-in $BASE ready ($((SECONDS - t0)) s)"
fi

# 2. pip inside the build gets this machine's pip settings (`pip config list`
#    and PIP_* variables: mirror indexes, find-links, constraints, a proxy's CA
#    bundle) as /etc/pip.conf, with the local paths they name mounted
#    read-only. When download.pytorch.org is unreachable, torch must come from
#    a torch-2.13.0+cpu wheel in find-links; TORCH_INDEX_URL is then PyPI (the
#    other indexes of the settings still apply).
mapfile -t args < <(python3 - "$work/pip.conf" <<'EOF_PY'
import os, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}
for line in out.splitlines():
    m = re.match(r"^(?:global|install|:env:)\.([\w-]+)='(.*)'$", line)
    if m:
        conf[m.group(1)] = m.group(2)
for k, v in os.environ.items():
    if k.startswith("PIP_"):
        conf[k[4:].lower().replace("_", "-")] = v
conf.pop("index-url", None)  # the Dockerfile chooses the index of torch; PyPI for the rest
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(conf.items())))
print("-v"); print(f"{sys.argv[1]}:/etc/pip.conf:ro")
mounts = set()
for v in conf.values():
    for tok in v.split():
        path = tok[len("file://"):] if tok.startswith("file://") else tok
        if not path.startswith("/") or not os.path.exists(path):
            continue
        if os.path.isfile(path):
            path = os.path.dirname(path) if not path.endswith(".crt") else path
        elif os.path.basename(path.rstrip("/")) == "simple":
            path = os.path.dirname(path.rstrip("/"))  # an index's files sit beside simple/
        mounts.add(path)
for m in sorted(mounts):
    print("-v"); print(f"{m}:{m}:ro")
EOF_PY
)
if ! timeout 20 curl -fsI https://download.pytorch.org/whl/cpu/torch/ >/dev/null 2>&1; then
  grep -q "find-links.*$WHEELS" "$work/pip.conf" && ls "$WHEELS"/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1 \
    || { echo "download.pytorch.org unreachable and no torch-2.13.0+cpu wheel in a find-links dir ($WHEELS)"; exit 1; }
  args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
echo "== pip settings for the build:"; sed 's/^/   /' "$work/pip.conf"
echo "== build args: ${args[*]}"

# 3. the real Dockerfile, unchanged
echo "== buildah bud docker/Dockerfile.cpu -> $TAG"
"${B[@]}" bud --isolation chroot --pull=never --layers=false "${args[@]}" \
  -f docker/Dockerfile.cpu -t "$TAG" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
grep -E "^pxpo [0-9]|No broken requirements" "$work/build.log" || true
echo "== built in $((SECONDS - t0)) s"

# 4. run it: the default command (pxpo --help), the user, the package version
c=$("${B[@]}" from -q "$TAG")
trap '"${B[@]}" rm "$c" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
run() { "${B[@]}" run --isolation chroot --user 10001:10001 "$c" -- "$@"; }
run pxpo --help | head -3
uid=$(run id -u)
ver=$(run pxpo --version)
user=$("${B[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$TAG")
label=$("${B[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}' "$TAG")
echo "uid=$uid version='$ver' image user=$user label=$label"
[ "$uid" = 10001 ] && [ "$ver" = "pxpo $VERSION" ] && [ "$user" = 10001:10001 ] && [ "$label" = "$VERSION" ]
echo "== image check passed in $((SECONDS - t0)) s"
# the image is ~2.5 GB in vfs storage: removed unless PXPO_KEEP_IMAGE=1
"${B[@]}" rm "$c" >/dev/null 2>&1 || true
[ "${PXPO_KEEP_IMAGE:-0}" = 1 ] || "${B[@]}" rmi "$TAG" >/dev/null
