"""Atomic writes: an artifact appears whole or not at all.

Every stage writes into a temporary sibling and renames it into place, so a
crash or a validation error never leaves a half-written artifact behind, and
an existing artifact is replaced only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block succeeds.

    On an exception the temporary directory is removed and ``target`` (if it
    existed) is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``target``; rename it into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(Path(path)) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target`` by renames; a previous ``target`` is removed only afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def jsonl_objects(text: str, where: str | Path, fix: str) -> Iterator[tuple[int, object]]:
    """Each non-blank line of a JSON Lines text as ``(line number, parsed value)``.

    A line that is not valid JSON raises :class:`pxpo.errors.PxpoInputError` naming
    ``<where>:<line>``, the parser's message and ``fix``; callers check the values' shape.
    """
    from .errors import PxpoInputError

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise PxpoInputError(f"{where}:{n}", f"not valid JSON ({e.msg})", fix) from None
