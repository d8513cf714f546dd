"""What the training loop receives, built from the config (``pxpo run`` and ``pxpo train`` share it)."""

from __future__ import annotations

from ..config import Config


def loop_collaborators(cfg: Config) -> dict:
    """What :func:`pxpo.training.loop.run` receives, built from ``cfg``: pipe, state, labeller, prompts.

    The labeller and the prompt source are built first, so a bad reward or
    prompt file fails before the model loads.
    """
    from ..training.distributed import check_launch
    from ..labellers import make_reward
    from ..prompts import PromptSource
    from ..training.state import build_train_state

    check_launch()  # a world size > 1 without a process group: exit 2 before anything is loaded or written
    labeller = make_reward(cfg.reward)
    prompts = PromptSource.load(cfg.prompts.source)
    pipe, state = build_train_state(cfg)
    return {"pipe": pipe, "state": state, "labeller": labeller, "prompts": prompts}
