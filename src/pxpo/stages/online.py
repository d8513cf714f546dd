"""``pxpo run``: the online loop in one process, its collaborators built from the config."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..tracking import JsonlTracker, Tracker


def loop_collaborators(cfg: Config) -> dict:
    """What :func:`pxpo.train.run` receives, built from ``cfg``: pipe, state, labeller, prompts.

    The labeller and the prompt source are built first, so a bad reward or
    prompt file fails before the model loads.
    """
    from ..core.rewards import make_labeller
    from ..prompts import PromptSource
    from ..training_state import build_train_state

    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    prompts = PromptSource.load(cfg.prompts.source)
    pipe, state = build_train_state(cfg)
    return {"pipe": pipe, "state": state, "labeller": labeller, "prompts": prompts}


def run_online(cfg: Config, tracker: Tracker | None = None, **loop_kwargs) -> dict:
    """``train.epochs`` epochs of sample -> label -> train into ``cfg.output_dir`` (resuming by default).

    ``tracker`` defaults to a :class:`~pxpo.tracking.JsonlTracker` writing
    ``<output_dir>/metrics.jsonl``; ``loop_kwargs`` go to :func:`pxpo.train.run`
    (``progress``, ``resume``, ``stop_after_epochs``, ...). Returns the summary.
    """
    from ..train import run

    tracker = tracker if tracker is not None else JsonlTracker(Path(cfg.output_dir))
    return run(cfg, tracker=tracker, **loop_collaborators(cfg), **loop_kwargs)
