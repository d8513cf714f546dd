"""KL divergence between the policy's and the reference policy's Gaussian transitions, per element.

Every sampler pxpo trains (stochastic DDIM, the LCM re-noising, the flow SDE)
takes a Gaussian step ``x_prev ~ N(mu, std^2 I)``; the step of the policy and
the step of the reference (the base model: with LoRA the same network with
its adapters disabled, with full fine-tuning a frozen copy) share the input
``x_t`` and the schedule. The KL of two diagonal Gaussians is a sum over
elements; pxpo keeps the elements (``(B, C, h, w)``, like the per-element
log-probs) so the penalty can be weighted pixel-wise, and the loss adds
``train.kl_coef`` times its mean (ALGORITHMS.md section 4; Flow-GRPO,
arXiv 2505.05470, uses the same closed form with beta = 0.04).

Per element, for the policy ``p = N(mu_p, s_p^2)`` and the reference ``r = N(mu_r, s_r^2)``::

    KL(p || r) = log(s_r / s_p) + (s_p^2 + (mu_p - mu_r)^2) / (2 s_r^2) - 1/2

which for equal stds (the samplers' std is fixed by the schedule) is
``(mu_p - mu_r)^2 / (2 s^2)``. It is 0 when the policy is the reference (I7).
"""

from __future__ import annotations

import torch


def gaussian_kl(mean_p: torch.Tensor, mean_ref: torch.Tensor, std_p, std_ref=None) -> torch.Tensor:
    """Per-element ``KL(N(mean_p, std_p^2) || N(mean_ref, std_ref^2))``.

    Args:
        mean_p, mean_ref: (B, C, h, w) means of the policy's and the reference's step.
        std_p: the policy's std, a tensor broadcastable to the means or a float.
        std_ref: the reference's std (default: ``std_p``, the equal-variance closed form).

    Returns:
        (B, C, h, w) KL per element, >= 0, in the dtype of ``mean_p`` promoted to at least float32.
    """
    dtype = torch.promote_types(mean_p.dtype, torch.float32)
    diff = mean_p.to(dtype) - mean_ref.to(dtype)
    s_p = torch.as_tensor(std_p, dtype=dtype, device=diff.device)
    if std_ref is None:
        return diff.pow(2) / (2 * s_p.pow(2))
    s_r = torch.as_tensor(std_ref, dtype=dtype, device=diff.device)
    return torch.log(s_r / s_p) + (s_p.pow(2) + diff.pow(2)) / (2 * s_r.pow(2)) - 0.5


def step_kl(policy_step, reference_step) -> torch.Tensor:
    """Per-element KL between two step outputs with ``mean`` and ``std`` (e.g. :class:`pxpo.core.policy.StepOutput`).

    Equal stds (the usual case: the same schedule) use the closed form
    ``(mu_p - mu_ref)^2 / (2 std^2)``; otherwise the general one. (B, C, h, w).
    """
    s_p, s_r = torch.as_tensor(policy_step.std), torch.as_tensor(reference_step.std)
    if s_p.shape == s_r.shape and torch.equal(s_p.to(s_r.device), s_r):
        return gaussian_kl(policy_step.mean, reference_step.mean, policy_step.std)
    return gaussian_kl(policy_step.mean, reference_step.mean, policy_step.std, reference_step.std)


def weighted_kl_mean(kl: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The KL term of the loss: the mean over elements, optionally weighted per element.

    ``kl`` (B, C, h, w); ``weights`` broadcastable to it (e.g. a (B, 1, h, w) map on
    the latent grid) or None. Weighted: ``sum(w * kl) / sum(w)`` (w >= 0).
    """
    if weights is None:
        return kl.mean()
    w = torch.broadcast_to(weights.to(kl.dtype), kl.shape)
    return (w * kl).sum() / w.sum().clamp_min(torch.finfo(kl.dtype).tiny)
