"""Helpers for tests that start real servers (MLflow tracking server, `mlflow models serve`)."""

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow -> gunicorn/uvicorn); SIGKILL what is left after 5 s.

    The server must have been started with ``start_new_session=True`` (its own process group).
    """
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the parent
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)
