"""``pxpo pipeline compile | run --local | submit``: the Kubeflow side of the CLI.

The pipeline definition lives in the repository's ``pipelines/`` (components
in ``components/``); these commands import it from the repository root (the
current directory or a parent).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .errors import PxpoInputError


def repo_root(start: Path | None = None) -> Path:
    p = (start or Path.cwd()).resolve()
    for d in (p, *p.parents):
        if (d / "pipelines" / "pxpo_pipeline.py").is_file() and (d / "components").is_dir():
            return d
    raise PxpoInputError(str(p), "not inside a pxpo repository (no pipelines/pxpo_pipeline.py)", "run from the repository root")


def _import_pipeline(root: Path):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from pipelines.pxpo_pipeline import PipelineOptions, build_pipeline

    return PipelineOptions, build_pipeline


def options_from(cfg, overrides: dict | None = None):
    PipelineOptions, _ = _import_pipeline(repo_root())
    o = PipelineOptions(rounds=cfg.pipeline.rounds, epochs_per_round=cfg.pipeline.epochs_per_round)
    for k, v in (overrides or {}).items():
        setattr(o, k, v)
    return o


def compile_pipeline(cfg, out: Path, options: dict | None = None) -> Path:
    """Write the pipeline's IR YAML (rounds from ``pipeline.rounds``)."""
    from kfp import compiler

    _, build = _import_pipeline(repo_root())
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(options_from(cfg, options)), str(out))
    return out


def pipeline_arguments(params_text: str, prompts_uri: str, model_ref: str, mlflow_tracking_uri: str) -> dict:
    return {"params": params_text, "prompts_uri": prompts_uri, "model_ref": model_ref, "mlflow_tracking_uri": mlflow_tracking_uri}


def run_local(cfg, params_text: str, *, prompts_uri: str, model_ref: str, workdir: Path, mlflow_tracking_uri: str) -> dict:
    """Run the whole DAG on this machine with ``kfp.local`` (SubprocessRunner, this environment).

    The sample/train/evaluate tasks run on the CPU here; their GPU requests
    apply on a cluster only. Returns the register decision plus timings.
    """
    from kfp import local

    _, build = _import_pipeline(repo_root())
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp_outputs"),
        enable_caching=True,
        cache_root=str(workdir / "kfp_cache"),
    )
    pipe = build(options_from(cfg, {"gpu": False}))
    t0 = time.perf_counter()
    task = pipe(**pipeline_arguments(params_text, prompts_uri, model_ref, mlflow_tracking_uri))
    wall = time.perf_counter() - t0
    decision = getattr(task, "output", task)  # the pipeline's output: register's decision artifact
    result = json.loads(Path(decision.path).read_text())
    result["wall_seconds"] = wall
    result["pipeline_root"] = str(workdir / "kfp_outputs")
    return result


def submit(cfg, params_text: str, *, host: str, package: Path, prompts_uri: str, model_ref: str, mlflow_tracking_uri: str, experiment: str, run_name: str | None, client=None):
    """Compile (if needed) and submit to a KFP endpoint with ``kfp.Client``; returns the run id."""
    import kfp

    if not package.exists():
        compile_pipeline(cfg, package)
    client = client or kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        str(package),
        arguments=pipeline_arguments(params_text, prompts_uri, model_ref, mlflow_tracking_uri),
        experiment_name=experiment,
        run_name=run_name,
        enable_caching=True,
    )
    return getattr(run, "run_id", None)
