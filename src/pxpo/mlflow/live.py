"""Live MLflow logging of ``pxpo run``: params, per-epoch metrics and images while the run trains.

``pxpo run --tracking-uri URI`` (default ``$MLFLOW_TRACKING_URI``; neither: no
MLflow) gives the loop a :class:`pxpo.tracking.FanOut` of the run directory's
:class:`pxpo.tracking.JsonlTracker` and an :class:`~pxpo.mlflow.tracking.MlflowTracker`
run from :func:`live_run`, so ``mlflow ui --backend-store-uri URI`` shows the
run as it goes: the metrics at each epoch and, every ``train.probe_every``
epochs, the image series ``probe_samples`` (base vs policy on the drift
probe's fixed batch) and ``reward_map_mean``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

RUN_FILE = "mlflow_run.json"  # in the output directory: the MLflow run a resumed `pxpo run` continues
FINAL_ARTIFACTS = ("reward_curve.png", "samples_last_epoch.png", "summary.json")


@contextlib.contextmanager
def live_run(cfg, tracking_uri: str, *, resume: bool = True) -> Iterator:
    """An open MLflow run for ``pxpo run`` into ``cfg.output_dir`` (experiment ``register.experiment``).

    When the loop will resume (``resume`` and a checkpoint in the output directory), the run recorded in
    ``<output_dir>/mlflow_run.json`` continues if it is in this store; otherwise a new run starts (named
    after the output directory; tags ``pxpo.stage=run``, ``pxpo.output_dir`` and the provenance tags of
    :func:`~pxpo.mlflow.tracking.standard_tags`) and is recorded there. On success the final files
    (reward curve, last samples, summary.json) are logged as artifacts; the run ends ``FINISHED``, or
    ``FAILED`` / ``KILLED`` when the block raises.
    """
    from ..storage import write_json
    from ..training.state import latest_checkpoint
    from .tracking import MlflowTracker, standard_tags

    run_dir = Path(cfg.output_dir)
    tracker = MlflowTracker(experiment=cfg.register.experiment, tracking_uri=tracking_uri)
    previous = _recorded_run(tracker, run_dir) if resume and latest_checkpoint(run_dir) is not None else None
    if previous is not None:
        tracker.start(run_id=previous)
    else:
        tracker.start(run_name=run_dir.resolve().name,
                      tags={**standard_tags(Path.cwd()), "pxpo.stage": "run", "pxpo.output_dir": str(run_dir.resolve())})
        write_json(run_dir / RUN_FILE, {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "tracking_uri": tracker.tracking_uri})
    with tracker:
        yield tracker
        for name in FINAL_ARTIFACTS:
            if (run_dir / name).is_file():
                tracker.log_artifact(run_dir / name)


def _recorded_run(tracker, run_dir: Path) -> str | None:
    """The run id in ``run_dir``'s RUN_FILE when it names a run of ``tracker``'s store; else None."""
    from mlflow.exceptions import MlflowException

    f = run_dir / RUN_FILE
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("tracking_uri") != tracker.tracking_uri:
        return None
    try:
        return tracker.client.get_run(rec["run_id"]).info.run_id
    except (MlflowException, KeyError, TypeError):
        return None
