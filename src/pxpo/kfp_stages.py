"""Adapter between KFP components and the ``pxpo`` CLI (the edge; no stage logic here).

Each component in ``components/`` calls :func:`run_stage` with the stage name,
the params.yaml text compiled into the pipeline, and artifact paths. The stage
runs exactly as ``pxpo <stage>`` does from a shell or a DVC stage.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def run_stage(stage: list[str], params_yaml: str, args: list[str], overrides: list[str] | None = None) -> None:
    """Run ``pxpo <stage...> --params <tmp params.yaml> <args> <overrides>``; raise on failure.

    A non-zero exit (bad input, failed validation) raises RuntimeError so KFP
    marks the task failed and nothing downstream runs.
    """
    from .cli import main

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "params.yaml"
        p.write_text(params_yaml)
        argv = [*stage, "--quiet", "--params", str(p), *args, *(overrides or [])]
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"pxpo {' '.join(stage)} failed with exit code {code} (see the message above)")


def model_ref_args(model_dir: str) -> list[str]:
    """``model.path=...`` for a base-model artifact: the built model, or the reference it records."""
    ref = Path(model_dir) / "pxpo_model_ref.json"
    if ref.is_file():
        return [f"model.path={json.loads(ref.read_text())['path']}"]
    return [f"model.path={model_dir}"]


def write_model_ref(out_dir: str, ref: str) -> None:
    """Record a user model (hub id or mounted path) as the base-model artifact, without copying it."""
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "pxpo_model_ref.json").write_text(json.dumps({"path": ref}))


def log_json_metrics(metrics_artifact, json_path: str, keys: list[str] | None = None) -> None:
    """Copy numeric entries of a JSON file (or the last line of a JSONL file) into a KFP Metrics artifact."""
    text = Path(json_path).read_text().strip()
    data = json.loads(text.splitlines()[-1]) if json_path.endswith(".jsonl") else json.loads(text)
    for k, v in data.items():
        if (keys is None or k in keys) and isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics_artifact.log_metric(k, float(v))
