"""``pxpo dense-reward train``: fit the learned dense reward model on labelled trajectories (pxpo.dense_reward)."""

from __future__ import annotations

from pathlib import Path


def train_dense_reward(trajectories: list[Path], out: Path, *, steps: int = 400, heldout_fraction: float = 0.2, seed: int = 0) -> dict:
    """Train, score on the held-out share and save; returns the metrics and ``out``."""
    from ..dense_reward import train_dense_reward as run

    return run(trajectories, out, steps=steps, heldout_fraction=heldout_fraction, seed=seed)
