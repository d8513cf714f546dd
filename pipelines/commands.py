"""``pxpo pipeline compile | run --local | submit``: the Kubeflow side of the CLI.

The pipeline is :func:`pipelines.pxpo_pipeline.build_pipeline` and its
components are the ``components`` package; both are installed with pxpo
(pyproject.toml), so these commands work from any directory. This module
lives with the pipeline, not in ``pxpo.kubeflow``: the library never
imports the ``pipelines`` package (the CLI imports this module lazily).

A run's arguments are one ``params_<section>`` string per params.yaml section
(:func:`pipeline_arguments`), and each task receives only the sections its
stage reads (:data:`pxpo.kubeflow.launcher.STAGE_SECTIONS`): editing
``register.margin`` re-runs register, not sampling and training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path

import yaml

from pxpo.config import section_yaml
from pxpo.errors import PxpoInputError
from pxpo.kubeflow.launcher import PIPELINE_SECTIONS, param_name


def options_from(cfg, overrides: dict | None = None):
    """:class:`PipelineOptions` from the ``pipeline`` section (every field it shares with them), then ``overrides``."""
    from pipelines.pxpo_pipeline import PipelineOptions

    o = PipelineOptions()
    given = cfg.to_dict().get("pipeline", {})
    for f in dataclasses.fields(PipelineOptions):
        if f.name in given:
            setattr(o, f.name, given[f.name])
    for k, v in (overrides or {}).items():
        if not hasattr(o, k):
            raise PxpoInputError(f"pipeline option {k}", "unknown", f"use one of {', '.join(f.name for f in dataclasses.fields(o))}")
        setattr(o, k, v)
    return o


def compile_pipeline(cfg, out: Path, options: dict | None = None) -> Path:
    """Write the pipeline's IR YAML (rounds from ``pipeline.rounds``; the params are run arguments)."""
    from kfp import compiler

    from pipelines.pxpo_pipeline import build_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options_from(cfg, options)), str(out))
    return out


def pipeline_arguments(cfg, *, prompts_uri: str, model_ref: str, mlflow_tracking_uri: str) -> dict:
    """A run's arguments: ``params_<section>`` (that section as ``section: value`` YAML) for each
    section a task reads, taken from the resolved config, plus the data / model / MLflow inputs."""
    data = cfg.to_dict()
    args = {param_name(s): section_yaml(data, [s]) for s in PIPELINE_SECTIONS}
    return {**args, "prompts_uri": prompts_uri, "model_ref": model_ref, "mlflow_tracking_uri": mlflow_tracking_uri}


def run_local(
    cfg, *, prompts_uri: str, model_ref: str, workdir: Path, mlflow_tracking_uri: str, options: dict | None = None, verbose: bool = False
) -> dict:
    """Run the whole DAG on this machine with ``kfp.local`` (SubprocessRunner, this environment).

    The sample/train/evaluate tasks run on the CPU here; their GPU requests,
    secrets and retries apply on a cluster only. Unless ``verbose``, the
    terminal gets one line per task and each task's full log (kfp's executor
    input included) goes to ``<workdir>/logs/<time>/<task>.log``
    (:mod:`pxpo.kubeflow.local_progress`). Returns the register decision plus
    timings and ``log_dir``.
    """
    import sys

    from kfp import local

    from pxpo.kubeflow.local_progress import TaskProgress, count_tasks

    from pipelines.pxpo_pipeline import build_pipeline

    workdir.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp_outputs"),
        enable_caching=True,
        cache_root=str(workdir / "kfp_cache"),
    )
    # kfp.local honours retries (sleeping through the backoff); a local failure is not a preempted node.
    pipe = build_pipeline(options_from(cfg, {**(options or {}), "gpu": False, "retries": 0}))
    arguments = pipeline_arguments(cfg, prompts_uri=prompts_uri, model_ref=model_ref, mlflow_tracking_uri=mlflow_tracking_uri)
    t0 = time.perf_counter()
    log_dir = None
    if verbose:
        task = pipe(**arguments)
    else:
        log_dir = workdir / "logs" / time.strftime("%Y%m%d-%H%M%S")
        progress = TaskProgress(log_dir, count_tasks(pipe), out=sys.stdout)
        print(f"running the pipeline with kfp.local; each task's full log: {log_dir}/<task>.log (--verbose shows them here)", flush=True)
        real_stdout, sys.stdout = sys.stdout, progress
        # kfp.local logs cache hits ("Task x cache hit") outside its own logging context: route them too
        root, hit_handler = logging.getLogger(), logging.StreamHandler(progress)
        level, _ = root.level, root.addHandler(hit_handler)
        root.setLevel(logging.INFO)
        try:
            with warnings.catch_warnings():
                # kfp.local's notes that cluster-only settings (display names, resource requests, the
                # task image) do not apply to a local subprocess: true of every local run, nothing to act on
                warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
                warnings.filterwarnings("ignore", message=r".*non-Python base image")
                task = pipe(**arguments)
        except RuntimeError as e:  # kfp.local: "Task 'x' finished with status FAILURE"
            raise PxpoTaskFailed(str(e), progress.failed, log_dir) from None
        finally:
            sys.stdout = real_stdout
            root.removeHandler(hit_handler)
            root.setLevel(level)
            progress.close()
    wall = time.perf_counter() - t0
    decision = getattr(task, "output", task)  # the pipeline's output: register's decision artifact
    result = json.loads(Path(decision.path).read_text())
    result["wall_seconds"] = wall
    result["pipeline_root"] = str(workdir / "kfp_outputs")
    result["log_dir"] = str(log_dir) if log_dir else None
    if log_dir:  # the register decision and timings (--verbose prints them)
        (log_dir / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    else:
        print(json.dumps(result, indent=2, default=str))
    return result


class PxpoTaskFailed(PxpoInputError):
    """A local pipeline task failed: the CLI prints the task, its log file and exits 1."""

    exit_code = 1

    def __init__(self, message: str, tasks: list[str], log_dir: Path):
        logs = ", ".join(str(Path(log_dir) / f"{t}.log") for t in tasks) or str(log_dir)
        super().__init__("pxpo pipeline run --local", message, f"read the task's full log ({logs}), fix the cause and run again (finished tasks come from the cache)")


def _declared_inputs(package: Path) -> set[str]:
    spec = next(yaml.safe_load_all(package.read_text()))
    return set(spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}))


def submit(cfg, *, host: str, package: Path, prompts_uri: str, model_ref: str, mlflow_tracking_uri: str, experiment: str,
           run_name: str | None, client=None, options: dict | None = None):
    """Compile (if needed, with ``options``) and submit to a KFP endpoint with ``kfp.Client``; returns the run id."""
    import kfp

    if not package.exists():
        compile_pipeline(cfg, package, options)
    arguments = pipeline_arguments(cfg, prompts_uri=prompts_uri, model_ref=model_ref, mlflow_tracking_uri=mlflow_tracking_uri)
    declared = _declared_inputs(package)
    if not set(arguments) <= declared:
        raise PxpoInputError(
            str(package),
            f"compiled by another pxpo version: it does not take {sorted(set(arguments) - declared)}",
            f"recompile it with `pxpo pipeline compile --out {package}` (or delete it)",
        )
    client = client or kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        str(package),
        arguments=arguments,
        experiment_name=experiment,
        run_name=run_name,
        enable_caching=True,
    )
    return getattr(run, "run_id", None)
