"""``pxpo run``: the online loop, its collaborators built from the config; ``--processes N`` launches N."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..tracking import FanOut, JsonlTracker, Tracker
from .collaborators import loop_collaborators


def run_online(cfg: Config, tracker: Tracker | None = None, *, tracking_uri: str | None = None, **loop_kwargs) -> dict:
    """``train.epochs`` epochs of sample -> label -> train into ``cfg.output_dir`` (resuming by default).

    ``tracker`` defaults to a :class:`~pxpo.tracking.JsonlTracker` writing
    ``<output_dir>/metrics.jsonl`` and ``<output_dir>/images/``. With ``tracking_uri``
    the main process also logs live to an MLflow run there (:func:`pxpo.mlflow.live.live_run`,
    through :class:`~pxpo.tracking.FanOut`). ``loop_kwargs`` go to :func:`pxpo.training.loop.run`
    (``progress``, ``resume``, ``stop_after_epochs``, ...). Returns the summary.
    """
    from ..training.distributed import check_launch
    from ..training.loop import run

    check_launch()
    tracker = tracker if tracker is not None else JsonlTracker(Path(cfg.output_dir))
    collaborators = loop_collaborators(cfg)
    if tracking_uri and collaborators["state"].accelerator.is_main_process:
        from ..mlflow.live import live_run

        with live_run(cfg, tracking_uri, resume=loop_kwargs.get("resume", True)) as mlflow_tracker:
            return run(cfg, tracker=FanOut(tracker, mlflow_tracker), **collaborators, **loop_kwargs)
    return run(cfg, tracker=tracker, **collaborators, **loop_kwargs)


def launch(cfg: Config, processes: int, args) -> int:
    """``pxpo run --processes N``: the same ``pxpo run`` (parsed ``args``) as N data-parallel processes on this node.

    torchrun (``python -m torch.distributed.run --standalone``, or the
    multi-node rendezvous of ``PET_*`` variables) starts the workers; each
    builds its Accelerator from torchrun's environment (gloo on CPU, NCCL on
    GPUs). The config is checked here first, so a batch that does not split
    over N exits with status 2 before any process starts. Replaces this process
    (its exit status is torchrun's).
    """
    import os

    from ..training.distributed import check_divisible, env_world_size, torchrun_argv, worker_env
    from ..errors import PxpoInputError

    if processes < 1:
        raise PxpoInputError(f"--processes {processes}", "must be >= 1", "pass the number of processes per node, e.g. --processes 2")
    if env_world_size() > 1:
        raise PxpoInputError("--processes", f"this is already one of {env_world_size()} launched processes", "drop --processes when launching with torchrun")
    check_divisible(cfg.sample.batch_size, cfg.train.batch_size, processes)
    argv = ["run", *(["--params", args.params] if args.params else []), *(["--quiet"] if args.quiet else [])]
    argv += [*(["--no-resume"] if args.no_resume else []), *(["--sections", args.sections] if args.sections else [])]
    argv += ["--tracking-uri", args.tracking_uri] if getattr(args, "tracking_uri", None) else []
    cmd = torchrun_argv(processes, [*argv, "--", *args.overrides])
    os.execve(cmd[0], cmd, worker_env())
    return 0  # not reached
