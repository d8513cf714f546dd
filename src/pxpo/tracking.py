"""Experiment trackers the training loop receives (it never builds one itself).

:class:`NullTracker` for tests, :class:`JsonlTracker` writes ``metrics.jsonl``
in the run directory (one line per epoch). An MLflow adapter plugs in at the
edge with the same three methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...


class NullTracker:
    """Drops everything (tests)."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass


class JsonlTracker:
    """Appends ``{"epoch": step, **metrics}`` lines to ``<run_dir>/metrics.jsonl``.

    On resume, lines for epochs at or after the resume point are dropped first
    (:meth:`truncate`), so the file always matches the checkpointed state.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, before_epoch: int) -> None:
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["epoch"] < before_epoch]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def log_params(self, params: dict) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(params, indent=2, default=str))

    def log_metrics(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": step, **metrics}) + "\n")

    def log_artifact(self, path: Path) -> None:
        pass
