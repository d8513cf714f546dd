"""What a test needs from the machine (a program, a module, the Label Studio environment): skipped where it is missing,
except under CI (``CI=true``), where a missing prerequisite FAILS the test.

CI runs ``scripts/test.sh``, which installs everything these tests need (``.venv``, ``.venv-labelstudio``, chromium);
a skip there would give a green run that never ran the check. The GPU tier is the exception: it skips without CUDA
everywhere (tests/conftest.py), CI included.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> None:
    """Skip with ``reason``; under CI, fail with it."""
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}. CI must provide it (scripts/test.sh installs it); "
                    "a skip here would pass a check that never ran.", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(ok: object, reason: str) -> None:
    if not ok:
        missing(reason)


def import_module(name: str, hint: str = "") -> ModuleType:
    """pytest.importorskip, failing under CI."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"cannot import {name} ({e}){'; ' + hint if hint else ''}")
        raise  # not reached: missing() raises
