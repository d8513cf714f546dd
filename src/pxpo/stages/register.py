"""``pxpo register``: log the policy to MLflow as challenger; move the champion alias if it passes the gate."""

from __future__ import annotations

from pathlib import Path

from ..config import Config


def register(cfg: Config, policy: Path, evaluation: Path, *, tracking_uri: str | None = None, mlflow_root: Path = Path("mlflow"),
             validation_reports: list[Path] = (), out: Path | None = None) -> dict:
    """Register ``policy`` (evaluated in ``evaluation``) and gate its promotion; returns the decision.

    ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else a SQLite store
    under ``mlflow_root``. Promotion needs every report in
    ``validation_reports`` to have passed. ``out`` also gets the decision JSON.
    """
    from ..mlflow.promotion import gate_and_register
    from ..mlflow.tracking import default_tracking_uri

    return gate_and_register(
        cfg,
        policy_dir=Path(policy),
        eval_dir=Path(evaluation),
        tracking_uri=tracking_uri or default_tracking_uri(Path(mlflow_root)),
        validation_reports=[Path(p) for p in validation_reports],
        out=Path(out) if out else None,
    )
