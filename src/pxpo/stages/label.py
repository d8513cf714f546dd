"""``pxpo label``: score a trajectory artifact's images and write its reward maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import Config
from ..errors import PxpoInputError
from . import report_path


def label(cfg: Config, trajectories: Path, *, out: Path | None = None, validate: bool = False,
          report: str | Path | None = None) -> dict:
    """Label the images of ``trajectories`` with the configured reward -> ``reward_maps.safetensors``.

    With ``out`` a labelled copy is written there, whole or not at all
    (pipelines treat their inputs as read-only); without it the maps are
    written beside the trajectories. With ``validate`` the Great Expectations
    reward-map suite runs first and nothing is written on failure.

    Returns:
        ``{"num_samples": n, "reward_mean": float, "labeller": name, "out": str}``.
    """
    from ..labellers import make_reward
    from ..training.rollout import label_images
    from ..trajectories import load_trajectories

    d = Path(trajectories)
    traj = load_trajectories(d)
    labeller = make_reward(cfg.reward)
    name = cfg.reward.describe()
    maps, info = label_images(labeller, traj.images, traj.prompts, where=f"reward labeller {name!r} on {d}")
    labelled = {"labeller": name, "kwargs": cfg.reward.kwargs} if not cfg.reward.components else {"labeller": name, "reward": cfg.reward.model_dump()}
    prefs = model_preferences(maps, traj.meta, cfg.reward.preference_scale, {**labelled, "preference_scale": cfg.reward.preference_scale})
    write_maps(d, maps, info={**labelled, **info}, out=out, validate=validate, report=report, preferences=prefs)
    target = Path(out) if out else d
    summary = {"num_samples": len(traj), "reward_mean": maps.mean().item(), "labeller": name, "out": str(target)}
    if prefs is not None:
        summary.update(num_pairs=len(prefs[1]), preference_mean=prefs[0].mean().item())
    return summary


def model_preferences(maps: torch.Tensor, meta: dict, scale: float, info: dict):
    """Aligned pairs (``meta["pairs"]``, ``sample.pairs``): the labeller's preference maps, else None.

    maps (N, H, W) -> (m (N/2, H, W) = clip((map_A - map_B) * scale, -1, 1), pairs (N/2, 2) [2p, 2p + 1], info)
    for ``preference_maps.safetensors`` (:func:`pxpo.trajectories.save_preference_maps`).
    """
    if "pairs" not in meta:
        return None
    from ..core.preference import aligned_pairs, preference_from_maps

    return preference_from_maps(maps[0::2], maps[1::2], scale), aligned_pairs(maps.shape[0]), {**info, "source": "model"}


def write_maps(d: Path, maps, info: dict, *, out: Path | None, validate: bool, report: str | Path | None, keep: list[int] | None = None,
               preferences: tuple | None = None) -> Path:
    """Write ``maps`` for the trajectories in ``d``: beside them, or into a labelled copy at ``out``.

    The one write path of ``pxpo label`` and ``pxpo label-studio pull`` (same checks, same
    validation). ``keep`` (sample indices, with ``out`` only) writes a copy holding just those
    samples, in that order; ``maps`` then has one map per kept sample. ``preferences``: (maps (P, H, W),
    pairs (P, 2), info) of aligned pairs, written as ``preference_maps.safetensors`` with the reward maps.
    """
    from ..storage import atomic_dir
    from ..trajectories import MAPS, PREFERENCES, check_reward_maps, load_trajectories, save_preference_maps, save_reward_maps, save_trajectories

    if preferences is not None and keep is not None:
        raise PxpoInputError("--out", "dropping samples would break the aligned pairs", "label every sample of a paired directory")

    def save(where: Path) -> None:
        save_reward_maps(where, maps, info)
        if preferences is not None:
            save_preference_maps(where, *preferences)

    d = Path(d)
    target = Path(out) if out else d
    check_reward_maps(maps, maps.shape[0], tuple(maps.shape[1:]), str(target / MAPS))
    if validate:
        from ..validation import check, validate_reward_maps

        h, w = maps.shape[1:]
        result = validate_reward_maps(maps, num_samples=maps.shape[0], height=h, width=w)
        check(result, report_path(report, target / "reward_maps"))
    if keep is not None:
        if not out:
            raise PxpoInputError("--out", "dropping samples needs a separate output", "pass --out DIR (the input is never changed)")
        from dataclasses import replace

        traj = load_trajectories(d)
        idx = torch.as_tensor(keep, dtype=torch.long)
        sub = replace(
            traj, latents=traj.latents[idx], log_probs=traj.log_probs[idx], prompt_embeds=traj.prompt_embeds[idx],
            prompts=[traj.prompts[i] for i in keep], seeds=[traj.seeds[i] for i in keep], images=traj.images[idx],
            meta={**traj.meta, "source_indices": list(keep)},
        )
        with atomic_dir(target) as tmp:
            save_trajectories(sub, tmp)
            save_reward_maps(tmp, maps, info)
    elif out:
        with atomic_dir(target) as tmp:
            shutil.copytree(d, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MAPS, PREFERENCES, "*.validation.json"))
            save(tmp)
    else:
        save(d)
    return target
