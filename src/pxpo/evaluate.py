"""The evaluation stage: held-out prompts, base vs trained policy, same seeds.

Writes into the output directory::

    metrics.json          reward (mean/std) of the policy and of the base model,
                          the gain, drift from the base (pixel L1, latent RMS),
                          per-prompt rewards, the mean reward map's left/right
                          and top/bottom contrasts
    reward_map_mean.png   mean reward map of the policy's samples (heatmap)
    samples_grid.png      base samples (top rows) and policy samples (bottom rows), same seeds
    reward_overlay.png    policy samples with their reward maps blended on top
    reward_maps.safetensors   maps of the policy's samples, (N, H, W)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import Config


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend reward maps (N, H, W) as a red-yellow-green heatmap over images (N, 3, H, W)."""
    import matplotlib

    lo, hi = float(maps.min()), float(maps.max())
    norm = (maps - lo) / (hi - lo + 1e-12)
    rgb = torch.from_numpy(matplotlib.colormaps["RdYlGn"](norm.numpy())[..., :3]).permute(0, 3, 1, 2).float()
    return (1 - alpha) * images + alpha * rgb


def drift_metrics(base_images, images, base_latents, latents) -> dict:
    """Drift of samples from the base model's with the same prompts and seeds.

    images (N, 3, H, W) in [0, 1], latents (N, C, h, w) (the final latents):
    ``drift_pixel_l1`` = mean |x - x_base|, ``drift_latent_rms`` = RMS of the latent difference.
    """
    return {
        "drift_pixel_l1": float((images.float() - base_images.float()).abs().mean()),
        "drift_latent_rms": float(((latents.float() - base_latents.float()) ** 2).mean().sqrt()),
    }


def heatmap_png(m: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import atomic_file

    fig, ax = plt.subplots(figsize=(3.6, 3), dpi=100)
    im = ax.imshow(m.numpy(), cmap="RdYlGn")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def evaluate(cfg: Config, policy_dir: str | None, out_dir: Path, *, samples_per_prompt: int = 8, seed: int = 12345, progress=False) -> dict:
    """Sample held-out prompts with the base model and the policy (same seeds) and score both."""
    from safetensors.torch import save_file

    from .core.rewards import make_labeller
    from .models import load_configured_pipeline, load_policy_into
    from .plots import save_grid
    from .prompts import load_weighted_prompts
    from .storage import atomic_dir
    from .rollout import label_images, sample_seed, sample_trajectories

    pipe = load_configured_pipeline(cfg)
    split = "heldout" if Path(cfg.prompts.source).is_dir() else "train"
    heldout, _ = load_weighted_prompts(cfg.prompts.source, split=split)
    prompts = [p for p in heldout for _ in range(samples_per_prompt)]
    seeds = [sample_seed(seed, 0, 0, i) for i in range(len(prompts))]
    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)

    base = sample_trajectories(pipe, cfg, prompts, seeds, progress=progress)
    load_policy_into(pipe, policy_dir)
    tuned = sample_trajectories(pipe, cfg, prompts, seeds, progress=progress)
    maps_b, _ = label_images(labeller, base.images, prompts)
    maps_t, _ = label_images(labeller, tuned.images, prompts)

    r_b, r_t = maps_b.mean((1, 2)), maps_t.mean((1, 2))
    mean_map = maps_t.mean(0)
    h, w = mean_map.shape
    per_prompt = {p: float(r_t[[i for i, q in enumerate(prompts) if q == p]].mean()) for p in heldout}
    metrics = {
        "split": split,
        "num_prompts": len(heldout),
        "num_samples": len(prompts),
        "reward_mean": float(r_t.mean()),
        "reward_std": float(r_t.std(unbiased=False)),
        "base_reward_mean": float(r_b.mean()),
        "reward_gain": float(r_t.mean() - r_b.mean()),
        **drift_metrics(base.images, tuned.images, base.latents[:, -1], tuned.latents[:, -1]),
        "map_left_minus_right": float(mean_map[:, : w // 2].mean() - mean_map[:, w - w // 2 :].mean()),
        "map_top_minus_bottom": float(mean_map[: h // 2].mean() - mean_map[h - h // 2 :].mean()),
        "per_prompt_reward": per_prompt,
        "policy": str(policy_dir) if policy_dir else None,
        "reward": {"name": cfg.reward.name, "kwargs": cfg.reward.kwargs},
    }
    with atomic_dir(Path(out_dir)) as tmp:
        n = min(len(prompts), 32)
        save_grid(torch.cat([base.images[:n], tuned.images[:n]]), tmp / "samples_grid.png", nrow=8)
        save_grid(overlay(tuned.images[:n], maps_t[:n]), tmp / "reward_overlay.png", nrow=8)
        heatmap_png(mean_map, tmp / "reward_map_mean.png", f"mean reward map ({cfg.reward.name})")
        save_file({"maps": maps_t.contiguous(), "base_maps": maps_b.contiguous()}, str(tmp / "reward_maps.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summarize(metrics: dict) -> str:
    return (
        f"held-out reward {metrics['base_reward_mean']:.4f} (base) -> {metrics['reward_mean']:.4f} (policy), "
        f"gain {metrics['reward_gain']:+.4f}; drift L1 {metrics['drift_pixel_l1']:.4f} on {metrics['num_samples']} samples"
    )


__all__ = ["evaluate", "summarize", "overlay", "drift_metrics", "np"]
