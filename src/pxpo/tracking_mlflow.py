"""MLflow tracking adapter (the edge): a :class:`pxpo.tracking.Tracker` backed by MLflow.

``import pxpo.tracking_mlflow`` does not import mlflow; it is imported when a
tracker is created.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

from . import __version__


def default_tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store (full model registry, no server) under ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> dotted keys (``train.learning_rate``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def standard_tags(repo_root: Path) -> dict:
    """git commit, dvc.lock hash (and the data hashes in it), KFP run id, pxpo version."""
    tags = {"pxpo.version": __version__}
    try:
        tags["git.commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        tags["git.commit"] = "unknown"
    lock = Path(repo_root) / "dvc.lock"
    if lock.is_file():
        import yaml

        text = lock.read_bytes()
        tags["dvc.lock.sha256"] = hashlib.sha256(text).hexdigest()
        try:
            stages = (yaml.safe_load(text) or {}).get("stages", {})
            outs = [f"{o['path']}={o.get('md5') or o.get('hash', '')}" for s in stages.values() for o in s.get("outs", [])]
            tags["dvc.data"] = ";".join(outs)[:4900]
        except (yaml.YAMLError, AttributeError, KeyError, TypeError):
            pass
    for var in ("KFP_RUN_ID", "KFP_POD_NAME"):
        if os.environ.get(var):
            tags["kfp.run_id" if var == "KFP_RUN_ID" else "kfp.pod"] = os.environ[var]
    return tags


class MlflowTracker:
    """Tracker protocol on MLflow: params flattened, metrics per step, artifacts and images.

    Use as ``with tracker.start(run_name=...): ...``.
    """

    def __init__(self, experiment: str = "pxpo", tracking_uri: str | None = None):
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient()
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            uri = mlflow.get_tracking_uri()
            location = None
            if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in ./mlruns
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    @contextlib.contextmanager
    def start(self, run_name: str | None = None, nested: bool = False):
        with self._mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, nested=nested) as run:
            self.run_id = run.info.run_id
            yield self

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k[:250], str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 500])

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_image(self, path: Path, name: str) -> None:
        from PIL import Image

        self._mlflow.log_image(Image.open(path), artifact_file=f"images/{name}")
