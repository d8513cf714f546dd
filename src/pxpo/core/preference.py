"""Region-level preferences (issue 24): preference maps on aligned pairs and the two DPO objectives' maths.

Pure: torch only (no I/O). Shapes: P pairs, K (pair, step) items of a chunk,
latents (C, h, w) (or any (...) a network takes), images (H, W).

A **preference map** m in [-1, 1], one per pair (A, B) at image resolution:
+1 where A is better, -1 where B is, 0 no preference. Like a reward map it is
area-averaged to the latent grid and broadcast over the latent channels
(ALGORITHMS.md 2.1, :func:`pxpo.core.advantages.to_latent_grid`).

Two losses, each with the whole-image method as its exact special case m = +1
(A preferred everywhere):

=====================  ==========================================================
code                   paper / reference code
=====================  ==========================================================
:func:`region_d3po_loss`   D3PO (arXiv 2311.13231), per trained step j:
                           d_X,e = log pi_theta(x^X_{j+1} | x^X_j) - log pi_ref(same), per element e;
                           margin = (1 / E) sum_e m_e (d_A,e - d_B,e), E = C h w;
                           L = -log sigmoid(beta margin).
                           m = +1: margin = mean_e d_A - mean_e d_B, the difference of
                           DDPO's mean-reduced log-ratios, which is D3PO's loss
                           (its ``log_prob`` is DDPO's mean over (C, h, w)).
:func:`region_dpo_loss`    Diffusion-DPO (arXiv 2311.12908, eq. 14), at one noise level:
                           e_X,e = (pred_theta - target)^2_e - (pred_ref - target)^2_e;
                           margin = (1 / E) sum_e m_e (e_A,e - e_B,e);
                           L = -log sigmoid(-beta_eff margin), beta_eff = beta T.
                           m = +1: the reference code's
                           ``-logsigmoid(-0.5 beta_dpo ((mse_w - mse_l) - (ref_w - ref_l)))``
                           with per-sample MSE means and beta_eff = 0.5 beta_dpo.
=====================  ==========================================================

The normalisation 1 / E (a mean over elements, not a sum) is what makes the
identities exact: both papers reduce per-element terms by their mean. A map
with values of both signs pulls A's log-ratio (or error) up where A is better
and B's where B is, in one sigmoid per pair.

The policy's **implied preference** of a pair agrees with the map when the
margin inside the sigmoid is positive (D3PO: ``margin``; Diffusion-DPO:
``-margin``); :func:`preference_accuracy` counts those, ties as one half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .advantages import to_latent_grid


# ---------------------------------------------------------------- maps


def preference_from_maps(maps_a: torch.Tensor, maps_b: torch.Tensor, scale: float) -> torch.Tensor:
    """m = clip((map_A - map_B) * scale, -1, 1): a preference map from two reward maps (P, H, W) each -> (P, H, W)."""
    return ((maps_a.float() - maps_b.float()) * scale).clamp(-1.0, 1.0)


def pool_preferences(maps: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Preference maps (P, H, W) -> the latent grid (P, h, w), area-averaged as reward maps are."""
    return to_latent_grid(maps, latent_hw)


def aligned_pairs(n: int) -> torch.Tensor:
    """The pairs of a paired sample stage: (n // 2, 2) rows [2p, 2p + 1]."""
    a = torch.arange(0, n - n % 2, 2)
    return torch.stack([a, a + 1], 1)


def pairs_are_aligned(pairs: torch.Tensor, n: int) -> bool:
    """Whether ``pairs`` (P, 2) are distinct rows [2p, 2p + 1] of a paired stage with n samples."""
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        return pairs.numel() == 0
    a, b = pairs[:, 0].long(), pairs[:, 1].long()
    return bool(((a % 2 == 0) & (b == a + 1) & (a >= 0) & (b < n)).all()) and len(torch.unique(a)) == len(a)


def expand_to_samples(maps: torch.Tensor, pairs: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample copies of aligned pairs' maps: (P, H, W), pairs (P, 2) [2p, 2p+1] -> (n, H, W).

    Rows 2p and 2p + 1 both hold pair p's map (read from row 2p by the objectives);
    a pair without a map (nobody labelled it) gets zeros: no preference, no gradient.
    """
    out = torch.zeros((n, *maps.shape[1:]), dtype=torch.float32)
    if len(pairs):
        out[pairs[:, 0].long()] = maps.float()
        out[pairs[:, 1].long()] = maps.float()
    return out


# ---------------------------------------------------------------- losses


@dataclass
class PreferenceLossOutput:
    """loss: 0-d mean over the K items, with gradients; margin: (K,) detached, > 0 where the
    policy agrees with the map; accuracy: 0-d detached (:func:`preference_accuracy`)."""

    loss: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor


def weighted_mean(m: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """(1 / E) sum_e m_e diff_e per item: m (K, h, w), (K, 1, h, w) or (K,); diff (K, C, h, w) -> (K,)."""
    if m.ndim == 1:
        m = m.view(-1, *([1] * (diff.ndim - 1)))
    elif m.ndim == diff.ndim - 1:
        m = m.unsqueeze(1)  # broadcast over the latent channels
    return (m.to(diff.dtype) * diff).flatten(1).mean(1)


def preference_accuracy(margin: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The share of items whose oriented ``margin`` (K,) is > 0 (ties count 1/2), among those whose map
    ``m`` (K, ...) is not all zero; NaN when none has a map."""
    has = m.flatten(1).abs().sum(1) > 0 if m.ndim > 1 else m != 0
    score = (margin > 0).float() + 0.5 * (margin == 0).float()
    return (score * has).sum() / has.sum() if has.any() else torch.tensor(float("nan"), device=margin.device)


def region_d3po_loss(d_a: torch.Tensor, d_b: torch.Tensor, m: torch.Tensor, beta: float) -> PreferenceLossOutput:
    """Region-level D3PO: -log sigmoid(beta (1 / E) sum_e m_e (d_A,e - d_B,e)), mean over items.

    Args:
        d_a, d_b: (K, C, h, w) per-element log-ratios log pi_theta - log pi_ref of the pair's
            A and B transitions at the same step (gradients through pi_theta).
        m: (K, h, w) preference maps on the latent grid (broadcast over C), or (K,) scalars.
        beta: D3PO's beta (0.1 in its configs).
    """
    margin = weighted_mean(m, d_a - d_b)
    loss = -F.logsigmoid(beta * margin).mean()
    return PreferenceLossOutput(loss, margin.detach(), preference_accuracy(margin.detach(), m))


def region_dpo_loss(err_a: torch.Tensor, err_b: torch.Tensor, m: torch.Tensor, beta_eff: float) -> PreferenceLossOutput:
    """Region-level Diffusion-DPO: -log sigmoid(-beta_eff (1 / E) sum_e m_e (e_A,e - e_B,e)), mean over items.

    Args:
        err_a, err_b: (K, C, h, w) per-element error differences
            (pred_theta - target)^2 - (pred_ref - target)^2 of A and B at a shared noise level and noise.
        m: (K, h, w) preference maps on the latent grid, or (K,).
        beta_eff: beta T (Diffusion-DPO's reference code: 0.5 beta_dpo, 2500 for SD 1.5).

    ``margin`` in the output is oriented (-margin of the sigmoid's argument / beta_eff): > 0
    where the policy lowered A's error relative to B's, weighted by the map.
    """
    inside = weighted_mean(m, err_a - err_b)
    loss = -F.logsigmoid(-beta_eff * inside).mean()
    margin = -inside.detach()
    return PreferenceLossOutput(loss, margin, preference_accuracy(margin, m))


# ---------------------------------------------------------------- forward process


def diffuse(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM forward process and the network's regression target.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) noise; target: noise (``epsilon``), sqrt(abar) noise -
    sqrt(1 - abar) x0 (``v_prediction``) or x0 (``sample``). x0, noise (B, C, h, w); abar (B,).
    """
    a = abar.float().view(-1, *([1] * (x0.ndim - 1)))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        return x_t, noise
    if prediction_type == "v_prediction":
        return x_t, a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x_t, x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def flow_diffuse(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow forward process: x_t = (1 - sigma) x0 + sigma noise, target velocity noise - x0 (B, C, h, w); sigma (B,)."""
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise, noise - x0
