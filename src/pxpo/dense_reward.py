"""Training the learned dense reward model (pxpo.core.rewards.learned) on labelled trajectories.

Input: trajectory directories with ``reward_maps.safetensors`` (people's maps
from ``pxpo label-studio pull`` or any labeller's from ``pxpo label``). A
held-out share of the samples (a seeded permutation) is kept out of training and
scored: the per-pixel Pearson correlation between predicted and labelled maps
over all held-out pixels. Output: a ``save_pretrained`` directory plus
``metrics.json``, written atomically.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .core.rewards.learned import DenseRewardNet
from .errors import PxpoInputError
from .storage import atomic_dir
from .trajectories import load_reward_maps, load_trajectories


def load_labelled(dirs: list[Path]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images (N, 3, H, W), prompts, maps (N, H, W) of labelled trajectory directories (one image size)."""
    images, prompts, maps = [], [], []
    for d in dirs:
        traj = load_trajectories(Path(d))
        m, _ = load_reward_maps(Path(d), len(traj), tuple(traj.images.shape[-2:]))
        if images and tuple(traj.images.shape[-2:]) != tuple(images[0].shape[-2:]):
            raise PxpoInputError(str(d), f"images of {tuple(traj.images.shape[-2:])}, the others are {tuple(images[0].shape[-2:])}", "train on one image size")
        images.append(traj.images)
        prompts += traj.prompts
        maps.append(m)
    if not images:
        raise PxpoInputError("--trajectories", "no directories", "give labelled trajectory directories")
    return torch.cat(images), prompts, torch.cat(maps).float()


def pixel_correlation(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Pearson correlation over all pixels of all maps (nan when either side is constant)."""
    a, b = pred.double().flatten(), target.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def fit(images: torch.Tensor, prompts: list[str], maps: torch.Tensor, *, steps: int = 400, batch_size: int = 16,
        lr: float = 3e-3, seed: int = 0, channels: int = 32) -> DenseRewardNet:
    """Fit a DenseRewardNet to (image, prompt) -> map by mean squared error on standardised labels."""
    torch.manual_seed(seed)
    mean, std = float(maps.mean()), float(maps.std())
    std = std if std > 1e-8 else 1.0
    model = DenseRewardNet(channels=channels, label_mean=mean, label_std=std)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        pred = model(images[idx], [prompts[i] for i in idx.tolist()])
        loss = F.mse_loss((pred - mean) / std, (maps[idx] - mean) / std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_dense_reward(trajectories: list[Path], out: Path, *, steps: int = 400, heldout_fraction: float = 0.2, seed: int = 0,
                       batch_size: int = 16) -> dict:
    """Train on labelled trajectories, score on the held-out share, save to ``out``.

    Returns:
        ``{"train_samples", "heldout_samples", "heldout_pixel_corr", "heldout_mse", "seconds", "out"}``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise PxpoInputError("--heldout-fraction", f"{heldout_fraction} is outside [0, 1)", "use e.g. 0.2")
    if steps < 1:
        raise PxpoInputError("--steps", f"{steps} < 1", "train at least one step")
    t0 = time.perf_counter()
    images, prompts, maps = load_labelled([Path(t) for t in trajectories])
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = int(round(n * heldout_fraction))
    if n - n_held < 1:
        raise PxpoInputError("--trajectories", f"{n} samples leave none to train on", "label more samples or lower --heldout-fraction")
    held, train = perm[:n_held], perm[n_held:]
    model = fit(images[train], [prompts[i] for i in train], maps[train], steps=steps, batch_size=batch_size, seed=seed)
    metrics = {"train_samples": len(train), "heldout_samples": len(held), "heldout_pixel_corr": float("nan"), "heldout_mse": float("nan")}
    if held:
        with torch.no_grad():
            pred = model(images[held], [prompts[i] for i in held])
        metrics["heldout_pixel_corr"] = pixel_correlation(pred, maps[held])
        metrics["heldout_mse"] = float(F.mse_loss(pred, maps[held]))
    metrics["seconds"] = time.perf_counter() - t0
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "steps": steps, "seed": seed, "trajectories": [str(t) for t in trajectories]}, indent=2) + "\n")
    return {**metrics, "out": str(out)}
