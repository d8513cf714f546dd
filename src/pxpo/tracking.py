"""Experiment trackers the training loop receives (it never builds one itself).

:class:`NullTracker` for tests, :class:`JsonlTracker` writes ``metrics.jsonl``
in the run directory (one line per epoch). An MLflow adapter plugs in at the
edge of the registration stage (``pxpo.mlflow``).

:class:`Tracker` declares every method the loop calls; the loop never probes
with ``hasattr``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    """What the training loop calls on its tracker (main process only)."""

    def log_params(self, params: dict) -> None:
        """Record the resolved config (nested dict) once per run."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Record one epoch's scalar metrics at ``step`` (the epoch index)."""

    def log_artifact(self, path: Path) -> None:
        """Record a file the run wrote."""

    def truncate(self, before_epoch: int) -> None:
        """Forget metrics of epochs >= ``before_epoch`` (a resumed run re-logs them)."""

    def history(self) -> list[dict]:
        """Every logged epoch's metrics, oldest first (``{"epoch": k, **metrics}``)."""


class NullTracker:
    """Drops everything (tests)."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def truncate(self, before_epoch: int) -> None:
        pass

    def history(self) -> list[dict]:
        return []


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
