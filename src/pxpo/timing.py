"""Optional wall-time records for the orchestration benchmark.

When ``PXPO_TIMINGS_FILE`` is set, :func:`record` appends one JSON line
``{"what", "seconds", "pid"}`` to it (stages run as separate processes under
KFP and DVC, so a file is the simplest shared sink). Unset: does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time


def record(what: str, seconds: float) -> None:
    path = os.environ.get("PXPO_TIMINGS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"what": what, "seconds": seconds, "pid": os.getpid()}) + "\n")


@contextlib.contextmanager
def timed(what: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record(what, time.perf_counter() - t0)
