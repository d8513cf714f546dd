"""``pxpo label``: score a trajectory artifact's images and write its reward maps."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import Config
from . import report_path


def label(cfg: Config, trajectories: Path, *, out: Path | None = None, validate: bool = False,
          report: str | Path | None = None) -> dict:
    """Label the images of ``trajectories`` with ``reward.name`` -> ``reward_maps.safetensors``.

    With ``out`` a labelled copy is written there, whole or not at all
    (pipelines treat their inputs as read-only); without it the maps are
    written beside the trajectories. With ``validate`` the Great Expectations
    reward-map suite runs first and nothing is written on failure.

    Returns:
        ``{"num_samples": n, "reward_mean": float, "labeller": name, "out": str}``.
    """
    from ..core.rewards import make_labeller
    from ..rollout import label_images
    from ..storage import atomic_dir
    from ..trajectories import MAPS, load_trajectories, save_reward_maps

    d = Path(trajectories)
    traj = load_trajectories(d)
    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    maps, info = label_images(labeller, traj.images, traj.prompts, where=f"reward labeller {cfg.reward.name!r} on {d}")
    target = Path(out) if out else d
    if validate:
        from ..validation import check, validate_reward_maps

        h, w = maps.shape[1:]
        result = validate_reward_maps(maps, num_samples=len(traj), height=h, width=w)
        check(result, report_path(report, target / "reward_maps"))
    info = {"labeller": cfg.reward.name, "kwargs": cfg.reward.kwargs, **info}
    if out:
        with atomic_dir(target) as tmp:
            shutil.copytree(d, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MAPS, "*.validation.json"))
            save_reward_maps(tmp, maps, info)
    else:
        save_reward_maps(d, maps, info)
    return {"num_samples": len(traj), "reward_mean": maps.mean().item(), "labeller": cfg.reward.name, "out": str(target)}
