"""Policy-gradient losses: PXPO (per element) and DDPO (per sample).

ALGORITHMS.md sections 1 and 2. Both come in two forms:

* ``"sf"`` (score function / REINFORCE): loss = -mean(A * logp)
* ``"ppo"`` (clipped importance sampling):
  ratio = exp(logp - logp_old);
  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

The log-ratio logp - logp_old is clamped to [-max_log_ratio, max_log_ratio]
before exp(): far off-policy a per-element ratio would overflow to inf and the
loss to NaN. Beyond the bound the element's ratio is constant (no gradient);
with PPO's clip range (<< 1) such elements are clipped anyway.

Advantages are clipped to [-adv_clip_max, adv_clip_max] first. PXPO weights
each latent element's log-prob by the advantage at its location and reduces
with a MEAN over (C, h, w), so a constant map reproduces DDPO exactly (I1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    """A loss and its detached diagnostics.

    Attributes:
        loss: scalar tensor to backpropagate.
        approx_kl: 0.5 * mean((logp - logp_old)^2), detached scalar.
        clipfrac: fraction of ratios outside [1 - eps, 1 + eps], detached scalar.
        ratio_mean: mean importance ratio, detached scalar.
    """

    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio_mean: torch.Tensor


MAX_LOG_RATIO = 20.0


def _policy_loss(logp, logp_old, adv, mode: str, clip_range: float, max_log_ratio: float = MAX_LOG_RATIO) -> LossOutput:
    """Shared SF / PPO loss on tensors of one shape (already broadcast)."""
    diff = logp - logp_old.detach()
    ratio = torch.exp(diff.clamp(-max_log_ratio, max_log_ratio))
    if mode == "sf":
        per = -adv * logp
    elif mode == "ppo":
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        per = torch.maximum(unclipped, clipped)
    else:
        raise ValueError(f"loss mode must be 'sf' or 'ppo', got {mode!r}")
    with torch.no_grad():
        approx_kl = 0.5 * (diff**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
        ratio_mean = ratio.mean()
    return LossOutput(per.mean(), approx_kl, clipfrac, ratio_mean)


def ddpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mode: str = "ppo",
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> LossOutput:
    """DDPO loss on per-sample log-probs.

    Args:
        log_prob: (B,) current logp (mean over C, h, w of the element log-probs),
            or (B, C, h, w) element log-probs, which are mean-reduced here.
        old_log_prob: same shape, from sampling time.
        advantages: (B,) one advantage per sample.
    """
    if log_prob.ndim > 1:
        log_prob = log_prob.flatten(1).mean(1)
        old_log_prob = old_log_prob.flatten(1).mean(1)
    adv = advantages.to(log_prob.dtype).clamp(-adv_clip_max, adv_clip_max)
    return _policy_loss(log_prob, old_log_prob, adv, mode, clip_range, max_log_ratio)


def pxpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mode: str = "ppo",
    ratio: str = "element",
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> LossOutput:
    """PXPO loss: each element's log-prob weighted by the advantage at its location.

    Args:
        log_prob: (B, C, h, w) current per-element log-probs.
        old_log_prob: (B, C, h, w) from sampling time.
        advantages: (B, h, w) advantage map on the latent grid (broadcast over
            channels), or (B, C, h, w), or (B,) (constant maps).
        mode: ``"sf"`` or ``"ppo"``.
        ratio: ``"element"`` (per-element ratio and clip) or ``"mean"`` (DDPO's
            ratio from the mean log-prob, advantage still per element).
    """
    if advantages.ndim == 1:
        adv = advantages.view(-1, 1, 1, 1)
    elif advantages.ndim == 3:
        adv = advantages[:, None]
    else:
        adv = advantages
    adv = adv.to(log_prob.dtype).clamp(-adv_clip_max, adv_clip_max).expand_as(log_prob)
    if ratio == "element" or mode == "sf":
        return _policy_loss(log_prob, old_log_prob, adv, mode, clip_range, max_log_ratio)
    if ratio != "mean":
        raise ValueError(f"ratio must be 'element' or 'mean', got {ratio!r}")
    # Ratio from the mean log-prob (one per sample), advantage per element:
    # loss = mean over (B, C, h, w) of max(-A_el r_b, -A_el clip(r_b)).
    lp = log_prob.flatten(1).mean(1).view(-1, 1, 1, 1).expand_as(log_prob)
    lp_old = old_log_prob.flatten(1).mean(1).view(-1, 1, 1, 1).expand_as(log_prob)
    out = _policy_loss(lp, lp_old, adv, mode, clip_range, max_log_ratio)
    return out
