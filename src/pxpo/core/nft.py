"""Pixel-wise DiffusionNFT: negative-aware fine-tuning on the forward process (arXiv 2509.16117).

ALGORITHMS.md section 4. DiffusionNFT needs no sampler log-probs: it takes the
epoch's clean samples x_0 (any solver, SDE or ODE), noises them with the
forward process, and trains the velocity field so that an implicit POSITIVE
policy fits the good samples and an implicit NEGATIVE policy fits the bad ones:

=====================  ======================================================
code                   paper / reference code
=====================  ======================================================
``x_t``                (1 - t) x_0 + t eps, t from the sampling schedule, fresh eps
``v_old``              the sampling policy's velocity (frozen, no gradient)
``v_pos``              (1 - beta) v_old + beta v_theta      (implicit positive policy)
``v_neg``              (1 + beta) v_old - beta v_theta      (implicit negative policy)
``x0_pos, x0_neg``     x_t - t v_pos, x_t - t v_neg         (x_0 predictions)
``w_pos, w_neg``       mean |x0_pos - x_0| per sample, detached, >= 1e-5 (adaptive weight)
``r``                  optimality in [0, 1]: 0.5 + 0.5 clip(A / A_max, -1, 1)
``loss``               A_max / beta * mean[ r (x0_pos - x_0)^2 / w_pos + (1 - r) (x0_neg - x_0)^2 / w_neg ]
=====================  ======================================================

The x_0-space squared errors with the adaptive per-sample weights, the
normalisation of r and the factor A_max / beta follow the reference code
(``ori_policy_loss = r * positive_loss / beta + (1 - r) * negative_loss / beta``,
``policy_loss = (ori_policy_loss * adv_clip_max).mean()``).

Pixel-wise (this project): with a reward MAP the advantage, hence r, is one
value per latent element (the map area-averaged to the latent grid and
broadcast over channels, ALGORITHMS.md 2.1), and the two squared errors are
weighted per element before the mean. The scalar loss is the special case of a
map that is constant per sample: :func:`nft_loss` broadcasts a (B,) r to the
element grid and takes the same path, so the two agree bit for bit (I5).
The adaptive weights w stay per sample (they do not depend on the reward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NFTLossOutput:
    """loss: scalar to backpropagate; the rest detached scalars for logging.

    positive / negative: mean weighted x_0 errors of the two implicit policies;
    old_deviation: mean (v_theta - v_old)^2 (0 at the first step of an epoch).
    """

    loss: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    old_deviation: torch.Tensor


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = 0.5 + 0.5 clip(A / A_max, -1, 1) in [0, 1], any shape (DiffusionNFT's normalisation)."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)


def forward_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps; x0, noise (B, C, h, w), sigma (B,)."""
    t = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def _per_element(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """r (B,), (B, h, w) or (B, C, h, w) -> (B, C, h, w)."""
    if r.ndim == 1:
        r = r.view(-1, *([1] * (like.ndim - 1)))
    elif r.ndim == like.ndim - 1:
        r = r[:, None]
    return r.to(like.dtype).expand_as(like)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    loss_scale: float = 5.0,
) -> NFTLossOutput:
    """The (pixel-wise) DiffusionNFT loss of one batch of forward-process points.

    Args:
        v_theta: the trained velocity at (x_t, t), (B, C, h, w), with gradients.
        v_old: the sampling policy's velocity at the same points, (B, C, h, w) (detached here).
        x_t: the noised samples, (B, C, h, w); x0: the clean samples, (B, C, h, w).
        sigma: t per sample, (B,).
        r: optimality in [0, 1]: (B,) per sample, (B, h, w) a map on the latent
            grid (broadcast over channels) or (B, C, h, w) per element.
        beta: the mixing coefficient of the implicit policies (> 0; 1.0 in the reference).
        loss_scale: the reference multiplies by adv_clip_max.
    """
    v_old = v_old.detach().float()
    v = v_theta.float()
    x_t, x0 = x_t.float(), x0.float()
    t = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    dims = tuple(range(1, x0.ndim))
    x0_pos = x_t - t * ((1 - beta) * v_old + beta * v)
    x0_neg = x_t - t * ((1 + beta) * v_old - beta * v)
    with torch.no_grad():
        w_pos = (x0_pos - x0).abs().mean(dims, keepdim=True).clamp(min=1e-5)
        w_neg = (x0_neg - x0).abs().mean(dims, keepdim=True).clamp(min=1e-5)
    pos = (x0_pos - x0) ** 2 / w_pos
    neg = (x0_neg - x0) ** 2 / w_neg
    rr = _per_element(r, x0)
    loss = (rr * pos + (1 - rr) * neg).mean() / beta * loss_scale
    detached = (pos.detach().mean(), neg.detach().mean(), ((v.detach() - v_old) ** 2).mean())
    return NFTLossOutput(loss, *detached)


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor, sigmas: torch.Tensor, step_index: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Per-element KL(policy || reference) of the flow SDE steps from one x_t whose velocities are ``v`` and ``v_ref``.

    ALGORITHMS.md section 4: on the same x_t the two SDE means differ only through the
    velocity, mu - mu_ref = (v - v_ref) (1 + s_t^2 (1 - t) / (2 t)) dt, and the step's
    variance is s_t^2 (-dt), so per element

        KL = (v - v_ref)^2 (1 + s_t^2 (1 - t) / (2 t))^2 (-dt) / (2 s_t^2)

    with s_t = a sqrt(t / (1 - t)) (:func:`pxpo.core.flow.sde_sigma`). A penalty
    ``kl_coef * mean(KL)`` then means for DiffusionNFT what it means for Flow-GRPO's
    sampler-side KL at noise level a (tests/core/test_nft.py checks it against
    :func:`pxpo.core.kl.step_kl` of two :func:`pxpo.core.flow.flow_sde_step` outputs).

    Args:
        v: (B, C, h, w) the trained velocity, with gradients. v_ref: (B, C, h, w) the reference's.
        sigmas: (T+1,) the sampling schedule; step_index: (B,) the level j of each row (t = sigmas[j]).
        noise_level: a > 0 of the SDE the KL is measured on.

    Returns:
        (B, C, h, w) float32, >= 0; 0 where v == v_ref.
    """
    from .flow import check_noise_level, sde_sigma

    check_noise_level(noise_level, "the NFT KL's noise level (sample.noise_level)")
    sig = sigmas.to(v.device).float()
    i = step_index.to(v.device).long()
    shape = (-1, *([1] * (v.ndim - 1)))
    t, t_next = sig[i].view(shape), sig[i + 1].view(shape)
    s_t = sde_sigma(t, sig[1] if sig.numel() > 1 else sig[0], noise_level)
    coef = (1 + s_t**2 * (1 - t) / (2 * t)) ** 2 * (t - t_next) / (2 * s_t**2)
    return (v.float() - v_ref.detach().float()) ** 2 * coef
