"""The evaluation stage: held-out prompts, base vs trained policy, same seeds.

Writes into the output directory::

    metrics.json          reward (mean/std) of the policy and of the base model,
                          the gain, drift from the base (pixel L1, latent RMS),
                          per-prompt rewards, the mean reward map's left/right
                          and top/bottom contrasts; with several reward
                          components each one's mean (``reward_<key>``,
                          ``base_reward_<key>``); the gold rewards of
                          ``evaluate.gold`` (labellers training never sees) for
                          both (``gold_<key>``, ``base_gold_<key>``, and
                          ``gold`` = {key: {base, policy}}); with aligned pairs
                          (``sample.pairs``) the policy's preference accuracy on
                          the base model's held-out pairs (``pref_accuracy``)
    reward_map_mean.png   mean reward map of the policy's samples (heatmap)
    samples_grid.png      base samples (rows labelled "base") and policy samples ("policy"), same seeds
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
    """Write a map (H, W) as a heatmap PNG (:func:`pxpo.plots.heatmap_image`)."""
    from .plots import heatmap_image, save_png

    save_png(heatmap_image(m, title), path)


def evaluate(cfg: Config, policy_dir: str | None, out_dir: Path, *, samples_per_prompt: int = 8, seed: int = 12345, progress=False) -> dict:
    """Sample held-out prompts with the base model and the policy (same seeds) and score both."""
    from safetensors.torch import save_file

    from .labellers import make_gold, make_reward
    from .models import load_configured_pipeline, load_policy_into
    from .plots import save_grid, save_labelled_grid
    from .prompts import load_weighted_prompts
    from .storage import atomic_dir
    from .training.rollout import label_images, sample_seed, sample_trajectories

    pipe = load_configured_pipeline(cfg)
    split = "heldout" if Path(cfg.prompts.source).is_dir() else "train"
    heldout, _ = load_weighted_prompts(cfg.prompts.source, split=split)
    if cfg.sample.pairs and samples_per_prompt % 2:
        from .errors import PxpoInputError

        raise PxpoInputError("evaluate.samples_per_prompt", f"{samples_per_prompt} samples per prompt cannot form aligned pairs (sample.pairs)", "use an even number")
    prompts = [p for p in heldout for _ in range(samples_per_prompt)]
    seeds = [sample_seed(seed, 0, 0, i) for i in range(len(prompts))]
    labeller = make_reward(cfg.reward)
    gold = make_gold(cfg.evaluate)  # built before sampling: a bad gold labeller fails fast

    base = sample_trajectories(pipe, cfg, prompts, seeds, progress=progress)
    load_policy_into(pipe, policy_dir)
    tuned = sample_trajectories(pipe, cfg, prompts, seeds, progress=progress)
    maps_b, info_b = label_images(labeller, base.images, prompts)
    maps_t, info_t = label_images(labeller, tuned.images, prompts)
    prefs = preference_metrics(pipe, cfg, base, maps_b) if cfg.sample.pairs else {}

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
        **component_metrics(info_b, info_t),
        **gold_metrics(gold, base.images, tuned.images, prompts),
        **prefs,
        "per_prompt_reward": per_prompt,
        "policy": str(policy_dir) if policy_dir else None,
        "reward": {"name": cfg.reward.describe(), "kwargs": cfg.reward.kwargs} if not cfg.reward.components else cfg.reward.model_dump(),
    }
    with atomic_dir(Path(out_dir)) as tmp:
        n = min(len(prompts), 32)
        save_labelled_grid({"base": base.images[:n], "policy": tuned.images[:n]}, tmp / "samples_grid.png", nrow=8)
        save_grid(overlay(tuned.images[:n], maps_t[:n]), tmp / "reward_overlay.png", nrow=8)
        heatmap_png(mean_map, tmp / "reward_map_mean.png", f"mean reward map ({cfg.reward.describe()})")
        save_file({"maps": maps_t.contiguous(), "base_maps": maps_b.contiguous()}, str(tmp / "reward_maps.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def preference_metrics(pipe, cfg: Config, base, maps_b: torch.Tensor) -> dict:
    """Preference accuracy of the policy (``pipe.unet``) on held-out aligned pairs (``sample.pairs``, issue 24).

    The pairs are the base model's held-out samples ``base`` (a :class:`pxpo.trajectories.Trajectories`
    of aligned pairs); their maps m = clip((map_A - map_B) * ``reward.preference_scale``, -1, 1) come from
    the base samples' reward maps ``maps_b`` (N, H, W). The policy's implied preference of a pair is
    sum_j mean_e m_e (d_A,j,e - d_B,j,e) over the sampler's trained steps, d = log pi_policy - log pi_base
    of the stored transitions (the base's log-probs are the stored ones): D3PO's margin. Returns
    ``pref_accuracy`` (share of pairs with a map whose implied preference is > 0, ties 1/2), ``pref_margin``
    (its mean) and ``pref_pairs``.
    """
    from .core.policies import make_policy
    from .core.preference import pool_preferences, preference_accuracy, preference_from_maps, weighted_mean

    policy = make_policy(cfg.sample, pipe.scheduler)
    unet = pipe.unet
    dev, n = unet.device, len(base)
    denoiser = policy.denoiser(unet, unet.dtype)
    m = pool_preferences(preference_from_maps(maps_b[0::2], maps_b[1::2], cfg.reward.preference_scale), tuple(base.latents.shape[-2:]))
    margin = torch.zeros(n // 2)
    uncond = base.uncond().to(dev)
    for j in policy.trained_steps.tolist():
        idx = torch.full((n,), j, dtype=torch.long)
        out = policy.log_prob(denoiser, base.latents[:, j].to(dev), idx, base.latents[:, j + 1].to(dev), base.cond().to(dev), uncond)
        d = (out.log_prob.float().cpu() - base.log_probs[:, j])
        margin += weighted_mean(m, d[0::2] - d[1::2])
    return {"pref_accuracy": float(preference_accuracy(margin, m)), "pref_margin": float(margin.mean()), "pref_pairs": n // 2}


def component_metrics(info_base: dict, info_policy: dict) -> dict:
    """``reward_<key>`` (policy) and ``base_reward_<key>`` of each reward component (several components only)."""
    from .core.rewards import component_means

    return {**{f"base_{k}": v for k, v in component_means(info_base).items()}, **component_means(info_policy)}


def gold_metrics(gold: dict, base_images: torch.Tensor, images: torch.Tensor, prompts: list[str]) -> dict:
    """The gold rewards (labellers training never sees) of base and policy samples (N, 3, H, W).

    Returns ``gold`` = {key: {"base", "policy"}} and the flat ``gold_<key>`` (policy),
    ``base_gold_<key>`` (and ``gold_<key>_accuracy`` where the labeller reports ``correct``).
    """
    from .training.rollout import label_images

    out: dict = {"gold": {}} if gold else {}
    for key, fn in gold.items():
        (mb, ib), (mp, ip) = (label_images(fn, x, prompts, where=f"gold reward {key!r}") for x in (base_images, images))
        b, p = float(mb.mean()), float(mp.mean())
        out["gold"][key] = {"base": b, "policy": p}
        out.update({f"gold_{key}": p, f"base_gold_{key}": b})
        if "correct" in ip:
            out.update({f"gold_{key}_accuracy": float(np.mean(ip["correct"])), f"base_gold_{key}_accuracy": float(np.mean(ib["correct"]))})
    return out


def summarize(metrics: dict) -> str:
    gold = "".join(f"; gold {k} {v['base']:.4f} -> {v['policy']:.4f}" for k, v in metrics.get("gold", {}).items())
    return (
        f"held-out reward {metrics['base_reward_mean']:.4f} (base) -> {metrics['reward_mean']:.4f} (policy), "
        f"gain {metrics['reward_gain']:+.4f}{gold}; drift L1 {metrics['drift_pixel_l1']:.4f} on {metrics['num_samples']} samples"
    )


__all__ = ["evaluate", "summarize", "overlay", "drift_metrics", "gold_metrics", "component_metrics", "np"]
