"""``pxpo sample``: roll out the policy on the epoch's prompts and write a trajectory artifact."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from . import report_path


def policy_round(policy: str | Path | None) -> int:
    """The round a policy directory continues from: its ``pxpo_round.json`` completed rounds, else 0."""
    rj = Path(policy or "") / "pxpo_round.json"
    return json.loads(rj.read_text())["completed_rounds"] if policy and rj.is_file() else 0


def sample(cfg: Config, out: Path, *, policy: str | Path | None = None, epoch: int | None = None,
           validate: bool = False, report: str | Path | None = None, progress: bool = False) -> dict:
    """Sample ``sample.batch_size * sample.num_batches`` trajectories and write them at ``out``.

    Args:
        policy: a ``pxpo train`` / ``pxpo run`` output (or LoRA dir); None samples the base model.
        epoch: round index for prompts and noise seeds; None continues the policy's round numbering.
        validate: run the Great Expectations trajectory suite before writing (nothing is written on failure).

    Returns:
        ``{"num_samples": n, "epoch": k, "out": str}``.
    """
    from ..models import load_configured_pipeline, load_policy_into
    from ..prompts import PromptSource
    from ..training.rollout import sample_seed, sample_trajectories
    from ..trajectories import save_trajectories

    pipe = load_configured_pipeline(cfg)
    load_policy_into(pipe, policy)
    n = cfg.sample.batch_size * cfg.sample.num_batches
    if epoch is None:
        epoch = policy_round(policy)
    prompts = PromptSource.load(cfg.prompts.source).draw_groups(n, cfg.sample.prompt_group, sample_seed(cfg.seed, epoch, 0, 0))
    seeds = [sample_seed(cfg.seed, epoch, 0, i) for i in range(n)]
    traj = sample_trajectories(pipe, cfg, prompts, seeds, progress=progress)
    traj.meta["policy"] = str(policy) if policy else None
    traj.meta["epoch"] = epoch
    if validate:
        from ..validation import check, validate_trajectories

        result = validate_trajectories(traj.latents, traj.log_probs, traj.timesteps, num_samples=n)
        check(result, report_path(report, Path(out)))
    save_trajectories(traj, Path(out))
    return {"num_samples": n, "epoch": epoch, "out": str(out)}
