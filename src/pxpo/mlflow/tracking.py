"""MLflow tracking: a :class:`pxpo.tracking.Tracker` backed by MLflow, tracking URIs, provenance tags.

``import pxpo.mlflow.tracking`` does not import mlflow; it is imported when a
tracker is created (mlflow is an optional dependency, extra ``pipeline``).

Local default: a SQLite store (``<root>/mlruns.db``, full model registry, no
server) with artifacts in ``<root>/mlartifacts``. MLflow's SQLite store puts
the artifacts of experiments created without an ``artifact_location`` under
``./mlruns`` of whatever directory the process happens to run in, so every
experiment pxpo creates against a SQLite URI gets an explicit location
(:func:`ensure_experiment`).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from .. import __version__

MAX_KEY_LENGTH = 250  # MLflow rejects (does not truncate) longer keys
# MLflow's standard source tags (mlflow.utils.mlflow_tags), shown in its UI
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "mlflow.source.git.dirty"
GIT_BRANCH_TAG = "mlflow.source.git.branch"

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def default_tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlruns.db`` (absolute path).

    Artifacts of experiments pxpo creates there go to ``<root>/mlartifacts``.
    A store created by an earlier pxpo under the name ``mlflow.db`` is kept.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db" if (root / "mlflow.db").is_file() and not (root / "mlruns.db").exists() else root / "mlruns.db"
    return f"sqlite:///{db}"


def artifact_location_for(tracking_uri: str) -> str | None:
    """``<dir of the database>/mlartifacts`` (a file URI) for a SQLite URI; None otherwise (the server decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    return (db.expanduser().resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """Id of experiment ``name``; created (with artifacts beside a SQLite store) if missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(uri))
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> dotted keys (``train.learning_rate``); empty dicts stay as values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def clean_key(key) -> str:
    """A valid MLflow param/metric/tag key: allowed characters only, at most 250 characters."""
    k = _BAD_KEY_CHARS.sub("_", str(key)).strip("/") or "_"
    if posixpath.normpath(k) != k or k in (".", "..") or k.startswith(".."):
        k = k.replace("/", "_")
        if k.startswith("."):
            k = "_" + k[1:]
    return k[:MAX_KEY_LENGTH]


def _as_float(v) -> float | None:
    """A metric value from a Python / numpy / torch scalar (bools as 0/1); None for anything else."""
    if isinstance(v, numbers.Real):  # numpy scalars register as numbers.Real too
        return float(v)
    try:
        if callable(getattr(v, "numel", None)) and v.numel() == 1:  # torch tensor
            return float(v.item())
        if getattr(v, "size", None) == 1 and callable(getattr(v, "item", None)):  # numpy array
            out = v.item()
            return float(out) if isinstance(out, numbers.Real) else None
    except (TypeError, ValueError, RuntimeError):
        return None
    return None


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _dvc_data(lock_text: bytes) -> str | None:
    """``path=hash;...`` over the outs of every stage in dvc.lock (dvc 2 and 3 formats)."""
    import yaml

    try:
        stages = (yaml.safe_load(lock_text) or {}).get("stages") or {}
        items = []
        for stage in stages.values():
            for o in stage.get("outs") or []:
                # dvc 3: {path, hash: md5, md5: <value>}; dvc 2: {path, md5}; cloud outs: etag/checksum
                h = o.get("md5") or o.get("etag") or o.get("checksum") or ""
                items.append(f"{o['path']}={h}")
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None
    return ";".join(items) if items else None


def standard_tags(repo_root: Path) -> dict:
    """Provenance tags for a run.

    MLflow's ``mlflow.source.git.commit`` (omitted outside a git checkout),
    ``mlflow.source.git.dirty`` and ``mlflow.source.git.branch``;
    ``dvc.lock.sha256`` and ``dvc.data`` (``path=md5;...`` of the outs in
    dvc.lock) when ``repo_root/dvc.lock`` exists; ``kfp.run_id`` from
    ``$KFP_RUN_ID`` (the pipeline sets it from
    ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` on the register task), ``kfp.run_name`` from ``$KFP_RUN_NAME``, and
    ``kfp.pod_name`` / ``kfp.pod_uid`` that the KFP v2 launcher injects;
    ``pxpo.version``.
    """
    repo_root = Path(repo_root)
    tags = {"pxpo.version": __version__}
    commit = _git(repo_root, "rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        status = _git(repo_root, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags[GIT_DIRTY_TAG] = "true" if status else "false"
        branch = _git(repo_root, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[GIT_BRANCH_TAG] = branch
    lock = repo_root / "dvc.lock"
    if lock.is_file():
        text = lock.read_bytes()
        tags["dvc.lock.sha256"] = hashlib.sha256(text).hexdigest()
        data = _dvc_data(text)
        if data:
            tags["dvc.data"] = data  # MLflow truncates tag values to 8000 characters
    for var, tag in (("KFP_RUN_ID", "kfp.run_id"), ("KFP_RUN_NAME", "kfp.run_name"),
                     ("KFP_POD_NAME", "kfp.pod_name"), ("KFP_POD_UID", "kfp.pod_uid")):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def _image_array(img):
    """numpy / torch image -> HWC (or HW) uint8 numpy array."""
    import numpy as np

    if hasattr(img, "detach"):  # torch tensor
        img = img.detach().cpu().float().numpy()
    a = np.asarray(img)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a


class MlflowTracker:
    """Tracker protocol on MLflow: params flattened, metrics per step, tags, artifacts and images.

    Either ``with tracker.start(run_name="r"): ...`` or ``with MlflowTracker(...) as t:``,
    or ``tracker.start(...)`` / ``tracker.end()``. The run is also MLflow's active
    run (fluent API), so ``mlflow.pyfunc.log_model`` inside it attaches to it.

    Args:
        experiment: experiment name (created if missing; beside the database for SQLite).
        tracking_uri: store URI; sets the process-wide tracking URI (default:
            the current one, ``$MLFLOW_TRACKING_URI`` or MLflow's default).
    """

    def __init__(self, experiment: str = "pxpo", tracking_uri: str | None = None):
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.experiment_id = ensure_experiment(experiment, self.tracking_uri)
        self.run_id: str | None = None  # the open run, or the last one after end()
        self._open = False

    # ----- run lifecycle -----------------------------------------------------

    def start(self, run_name: str | None = None, nested: bool = False, parent_run_id: str | None = None,
              tags: dict | None = None, run_id: str | None = None) -> MlflowTracker:
        """Start (or with ``run_id`` resume) a run; returns self (usable as a context manager).

        ``nested=True`` makes it a child of the active run; ``parent_run_id`` a
        child of that run (which must be the active run if there is one).
        """
        if self._open:
            raise RuntimeError(f"MlflowTracker already has run {self.run_id} open; call end() first")
        run = self._mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else self.experiment_id,
            run_name=run_name,
            nested=nested or (parent_run_id is not None and self._mlflow.active_run() is not None),
            parent_run_id=parent_run_id,
        )
        self.run_id = run.info.run_id
        self._open = True
        if tags:  # through log_batch, which enforces MLflow's length limits (create_run does not)
            self.set_tags(tags)
        return self

    def end(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); no-op when none is open.

        ``run_id`` keeps the id of the ended run.
        """
        if not self._open:
            return
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self._mlflow.end_run(status=status)
        else:  # ended elsewhere or not the top of the fluent stack
            self.client.set_terminated(self.run_id, status=status)
        self._open = False

    def __enter__(self) -> MlflowTracker:
        if not self._open:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run: use `with tracker.start(run_name=...):` first")
        return self.run_id

    # ----- Tracker protocol --------------------------------------------------

    def log_params(self, params: dict) -> None:
        """Flatten (dotted keys), stringify and log (MLflow batches them and truncates values to 6000 characters).

        Re-logging an identical value is a no-op; a changed value (params are
        immutable in MLflow) is kept as tag ``pxpo.param_changed.<key>`` with a warning.
        """
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        run_id = self._run()
        flat = {clean_key(k): str(v) for k, v in flatten(params).items()}
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        # compared as stored: a long value comes back truncated
        changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v[:MAX_PARAM_VAL_LENGTH]}
        self.client.log_batch(run_id, params=new)
        if changed:
            warnings.warn(f"MLflow params are immutable; changed values kept as tags: {sorted(changed)[:5]}", stacklevel=2)
            self.client.log_batch(run_id, tags=[RunTag(clean_key(f"pxpo.param_changed.{k}"), v) for k, v in changed.items()])

    def log_metrics(self, metrics: dict, step: int, *, model_id: str | None = None) -> None:
        """Numeric values (Python, numpy or torch scalars; nested dicts flattened) at ``step``; others skipped.

        ``model_id`` (``models:/<model_id>``, e.g. ``ModelInfo.model_id``) also
        attaches them to that logged model (and so to its registered versions).
        """
        from mlflow.entities import Metric

        run_id = self._run()
        now = int(time.time() * 1000)
        ms = []
        for k, v in flatten(metrics).items():
            f = _as_float(v)
            if f is not None:
                ms.append(Metric(clean_key(k), f, now, int(step), model_id=model_id, run_id=run_id))
        self.client.log_batch(run_id, metrics=ms)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents (under ``artifact_path``, default its name)."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self._run(), str(p), artifact_path=artifact_path or p.name)
        else:
            self.client.log_artifact(self._run(), str(p), artifact_path=artifact_path)

    def truncate(self, before_epoch: int) -> None:
        """MLflow keeps every value it was given: a resumed run logs epochs >= ``before_epoch`` again, next to
        the earlier values at those steps. Tag ``pxpo.resumed_at_epoch`` records where (0: nothing)."""
        if before_epoch > 0:
            self.set_tags({"pxpo.resumed_at_epoch": before_epoch})

    def history(self) -> list[dict]:
        """Empty: the run directory's ``metrics.jsonl`` is the history (:class:`pxpo.tracking.FanOut` reads it there)."""
        return []

    # ----- extras --------------------------------------------------------------

    def set_tags(self, tags: dict) -> None:
        """Tags; values stringified (MLflow truncates them to 8000 characters), None skipped."""
        from mlflow.entities import RunTag

        self.client.log_batch(self._run(), tags=[RunTag(clean_key(k), str(v)) for k, v in tags.items() if v is not None])

    def log_image(self, path_or_array, name: str, step: int | None = None) -> None:
        """An image file (copied byte for byte) or array (HW, HWC or CHW; uint8, or float in [0, 1]).

        Stored as ``images/<name>`` (``.png`` added when ``name`` has no
        extension); with ``step``, logged as the step of image series ``name``
        (MLflow's image-over-time view) instead.
        """
        run_id = self._run()
        if isinstance(path_or_array, (str, os.PathLike)):
            src = Path(path_or_array)
            if step is not None:
                from PIL import Image

                with Image.open(src) as im:
                    self.client.log_image(run_id, im.convert("RGB"), key=clean_key(name), step=int(step))
                return
            fname = name if Path(name).suffix else name + (src.suffix or ".png")
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / Path(fname).name
                shutil.copyfile(src, dst)
                sub = posixpath.join("images", posixpath.dirname(fname)).rstrip("/")
                self.client.log_artifact(run_id, str(dst), artifact_path=sub)
            return
        arr = _image_array(path_or_array)
        if step is not None:
            self.client.log_image(run_id, arr, key=clean_key(name), step=int(step))
        else:
            fname = name if Path(name).suffix else name + ".png"
            self.client.log_image(run_id, arr, artifact_file=f"images/{fname}")
