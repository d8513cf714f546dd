"""Start a real Label Studio server for the tests: its own environment, localhost, SQLite, a throwaway data dir.

The server's environment (Django and its pinned web stack) is kept out of pxpo's:
``scripts/setup-labelstudio.sh`` creates ``.venv-labelstudio``; ``PXPO_LABEL_STUDIO_BIN``
points at another ``label-studio`` executable.

A fresh data directory costs ~40 CPU-s of Django migrations at the first start, against ~4 s for a migrated
one. ``scripts/setup-labelstudio.sh`` therefore runs ``python tests/labelstudio_server.py --template`` once
per environment: a real start on an empty directory (migrations, the test user and its token), stopped and
kept as ``<env>/pxpo-empty-data``. :func:`start` copies it into the throwaway data dir when it is there (and
migrates from nothing when it is not). Only the standard library is imported here, so any Python runs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "pxpo0test0token0000000000000000000000001"


def label_studio_bin() -> Path | None:
    explicit = os.environ.get("PXPO_LABEL_STUDIO_BIN")
    p = Path(explicit) if explicit else ROOT / ".venv-labelstudio" / "bin" / "label-studio"
    return p if p.is_file() else None


@dataclass
class Server:
    url: str
    token: str
    proc: subprocess.Popen
    log: Path
    startup_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def template_dir(exe: Path) -> Path:
    """The migrated empty data directory kept beside the environment of ``exe`` (``<env>/bin/label-studio``)."""
    return exe.resolve().parent.parent / "pxpo-empty-data"


def make_template() -> Path:
    """Start the server once on an empty data dir (migrations, the test user), stop it, keep the dir (atomically)."""
    import shutil
    import tempfile

    exe = label_studio_bin()
    assert exe is not None, "no label-studio executable (bash scripts/setup-labelstudio.sh)"
    final = template_dir(exe)
    work = Path(tempfile.mkdtemp(prefix=".pxpo-empty-data-", dir=final.parent))
    try:
        server = start(work, template=False)
        stop(server)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work / "data", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def start(data_dir: Path, timeout: float = 300.0, template: bool = True) -> Server:
    """A server on a free localhost port with its data in ``data_dir/data`` (a copy of the migrated template
    when ``template`` and it exists)."""
    exe = label_studio_bin()
    assert exe is not None, "no label-studio executable (bash scripts/setup-labelstudio.sh)"
    if template and template_dir(exe).is_dir() and not (data_dir / "data").exists():
        import shutil

        shutil.copytree(template_dir(exe), data_dir / "data")
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))},
        "LABEL_STUDIO_USERNAME": "pxpo@example.com",
        "LABEL_STUDIO_PASSWORD": "pxpo-test-password",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "DJANGO_DB": "sqlite",
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "server.log"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port), "--data-dir", str(data_dir / "data")],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(f"{url}/api/projects", headers={"Authorization": f"Token {TOKEN}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return Server(url, TOKEN, proc, log, time.monotonic() - t0)
        except OSError:
            pass
        time.sleep(0.5)
    stop(Server(url, TOKEN, proc, log, 0.0))
    raise RuntimeError(f"label-studio did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    """End the server's process group (the server and the workers it started), politely first."""
    import signal

    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--template"]:
        sys.exit("usage: python tests/labelstudio_server.py --template   (the migrated empty data dir; see the docstring)")
    t0 = time.monotonic()
    print(f"Label Studio: migrated empty data dir {make_template()} in {time.monotonic() - t0:.0f} s")
