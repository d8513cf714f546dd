"""Policy-gradient losses: PXPO (per element) and DDPO (per sample).

ALGORITHMS.md sections 1 and 2. Both come in two forms:

* ``"sf"`` (score function / REINFORCE): loss = -mean(A * logp)
* ``"ppo"`` (clipped importance sampling):
  ratio = exp(logp - logp_old);
  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

``clip_range`` is the PPO epsilon (PPO: arXiv 1707.06347) of a MEAN ratio:
DDPO's ratio of the per-sample mean log-probs, and PXPO's ``ratio="mean"``.
PXPO's per-element ratios are clipped at :func:`element_clip_range` =
clip_range * sqrt(d) for a latent of d = C*h*w elements (docs/algorithms.md,
"The clip range at any latent size"): within an epoch an element's log-ratio
is z_i u_i - u_i^2/2 (z_i the action's standard noise, u_i the policy mean's
move over the step's std), which for small moves spreads sqrt(d) times as far
as the mean over the sample's elements, so one ``clip_range`` clips about the
same share of elements as of DDPO's samples at any latent size (256 elements
in the embedded default, 16,384 in SD 1.5).

The log-ratio logp - logp_old is clamped to [-max_log_ratio, max_log_ratio]
before exp(): far off-policy a per-element ratio would overflow to inf and the
loss to NaN. Beyond the bound the element's ratio is constant (no gradient);
with PPO's clip range (<< 1) such elements are clipped anyway.

Advantages are clipped to [-adv_clip_max, adv_clip_max] first. PXPO weights
each latent element's log-prob by the advantage at its location and reduces
with a MEAN over (C, h, w), so a constant map reproduces DDPO exactly (I1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    """A loss and its detached diagnostics (0-d tensors on the loss's device: no host sync).

    Attributes:
        loss: scalar tensor to backpropagate.
        approx_kl: 0.5 * mean((logp - logp_old)^2) of the ratio the loss uses.
        clipfrac: fraction of the loss's ratios outside its clip range.
        ratio_mean: mean importance ratio the loss uses.
        clipfrac_element: fraction of per-element ratios outside
            1 +- :func:`element_clip_range` (what PXPO's element ratio clips);
            NaN when only per-sample log-probs were given.
        clipfrac_mean: fraction of per-sample mean-log-prob ratios outside
            1 +- clip_range (what DDPO's ratio clips).
        log_ratio_rms_element: root mean square of the per-element log-ratios
            (NaN without element log-probs).
        log_ratio_rms_mean: root mean square of the per-sample mean log-ratios;
            log_ratio_rms_element / log_ratio_rms_mean is about sqrt(d).
        clip_element: the per-element clip range used (a float).
    """

    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio_mean: torch.Tensor
    clipfrac_element: torch.Tensor | None = None
    clipfrac_mean: torch.Tensor | None = None
    log_ratio_rms_element: torch.Tensor | None = None
    log_ratio_rms_mean: torch.Tensor | None = None
    clip_element: float = float("nan")

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The detached diagnostics by log name, in :data:`DIAGNOSTICS` order (``ratio`` is ``ratio_mean``).

        0-d tensors on the loss's device; a field left None is NaN.
        """
        nan = torch.full((), float("nan"), device=self.loss.device)
        vals = (self.approx_kl, self.clipfrac, self.ratio_mean, self.clipfrac_element, self.clipfrac_mean)
        vals += (self.log_ratio_rms_element, self.log_ratio_rms_mean)
        return {k: nan if v is None else v for k, v in zip(DIAGNOSTICS, vals)}


DIAGNOSTICS = ("approx_kl", "clipfrac", "ratio", "clipfrac_element", "clipfrac_mean", "log_ratio_rms_element", "log_ratio_rms_mean")
"""The names :meth:`LossOutput.diagnostics` logs, in order."""

MAX_LOG_RATIO = 20.0


def element_clip_range(clip_range: float, n_elements: int) -> float:
    """The PPO clip of per-element ratios for a latent of ``n_elements`` (C*h*w) elements.

    clip_range * sqrt(n_elements). An element's log-ratio is z_i u_i - u_i^2 / 2
    (z_i ~ N(0, 1) the action's noise, independent of u_i = the mean's move over
    the step's std within an epoch), so while the moves are small (rms(u) well
    below 2 / sqrt(d)) it spreads sqrt(d) times as far as the mean of the d of
    them, and this clips about the share of elements that ``clip_range`` clips of
    DDPO's mean ratios. Larger moves shift the mean ratio by -mean(u^2) / 2 and
    the mean ratio is then clipped more often (docs/algorithms.md: measured).
    Examples: 1e-4 at 4x64x64 (SD 1.5) -> 0.0128; 0.0125 at 4x8x8 -> 0.2.
    """
    if n_elements < 1:
        raise ValueError(f"n_elements must be >= 1, got {n_elements}")
    return clip_range * math.sqrt(n_elements)


def _ppo_per(logp, diff, adv, mode: str, clip: float, max_log_ratio: float):
    """Per-entry loss terms and ratios on tensors of one shape (already broadcast)."""
    ratio = torch.exp(diff.clamp(-max_log_ratio, max_log_ratio))
    if mode == "sf":
        return -adv * logp, ratio
    if mode == "ppo":
        return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)), ratio
    raise ValueError(f"loss mode must be 'sf' or 'ppo', got {mode!r}")


def _diagnostics(diff_el, diff_mean, clip_range: float, clip_el: float, max_log_ratio: float) -> dict:
    """Element and mean-ratio diagnostics, detached; ``diff_el`` (B, ...) or None, ``diff_mean`` (B,)."""
    with torch.no_grad():

        def frac(diff, clip):
            return ((torch.exp(diff.clamp(-max_log_ratio, max_log_ratio)) - 1.0).abs() > clip).float().mean()

        nan = torch.full((), float("nan"), device=diff_mean.device)
        return dict(
            clipfrac_element=nan if diff_el is None else frac(diff_el, clip_el),
            clipfrac_mean=frac(diff_mean, clip_range),
            log_ratio_rms_element=nan if diff_el is None else diff_el.float().square().mean().sqrt(),
            log_ratio_rms_mean=diff_mean.float().square().mean().sqrt(),
            clip_element=clip_el,
        )


def _output(per, ratio, diff, clip: float, diags: dict) -> LossOutput:
    with torch.no_grad():
        approx_kl = 0.5 * (diff**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
        ratio_mean = ratio.mean()
    return LossOutput(per.mean(), approx_kl, clipfrac, ratio_mean, **diags)


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
            or (B, C, h, w) element log-probs, which are mean-reduced here (and
            give the element diagnostics too).
        old_log_prob: same shape, from sampling time.
        advantages: (B,) one advantage per sample.
        clip_range: the PPO epsilon of the mean ratio.
    """
    diff_el, clip_el = None, float("nan")
    if log_prob.ndim > 1:
        diff_el = (log_prob - old_log_prob).detach()
        clip_el = element_clip_range(clip_range, log_prob[0].numel())
        log_prob = log_prob.flatten(1).mean(1)
        old_log_prob = old_log_prob.flatten(1).mean(1)
    adv = advantages.to(log_prob.dtype).clamp(-adv_clip_max, adv_clip_max)
    diff = log_prob - old_log_prob.detach()
    per, ratio = _ppo_per(log_prob, diff, adv, mode, clip_range, max_log_ratio)
    return _output(per, ratio, diff, clip_range, _diagnostics(diff_el, diff.detach(), clip_range, clip_el, max_log_ratio))


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
        ratio: ``"element"`` (per-element ratio, clipped at
            :func:`element_clip_range` (clip_range, C*h*w)) or ``"mean"`` (DDPO's
            ratio from the mean log-prob, clipped at clip_range; advantage still
            per element).
        clip_range: the PPO epsilon of the mean ratio.
    """
    if ratio not in ("element", "mean"):
        raise ValueError(f"ratio must be 'element' or 'mean', got {ratio!r}")
    if advantages.ndim == 1:
        adv = advantages.view(-1, 1, 1, 1)
    elif advantages.ndim == 3:
        adv = advantages[:, None]
    else:
        adv = advantages
    adv = adv.to(log_prob.dtype).clamp(-adv_clip_max, adv_clip_max).expand_as(log_prob)
    clip_el = element_clip_range(clip_range, log_prob[0].numel())
    diff_el = log_prob - old_log_prob.detach()
    diff_mean = diff_el.detach().flatten(1).mean(1)
    diags = _diagnostics(diff_el.detach(), diff_mean, clip_range, clip_el, max_log_ratio)
    if ratio == "element" or mode == "sf":
        per, r = _ppo_per(log_prob, diff_el, adv, mode, clip_el, max_log_ratio)
        return _output(per, r, diff_el, clip_el, diags)
    # Ratio from the mean log-prob (one per sample), advantage per element:
    # loss = mean over (B, C, h, w) of max(-A_el r_b, -A_el clip(r_b)).
    lp = log_prob.flatten(1).mean(1).view(-1, 1, 1, 1).expand_as(log_prob)
    lp_old = old_log_prob.flatten(1).mean(1).view(-1, 1, 1, 1).expand_as(log_prob)
    diff = lp - lp_old.detach()
    per, r = _ppo_per(lp, diff, adv, mode, clip_range, max_log_ratio)
    return _output(per, r, diff, clip_range, diags)
