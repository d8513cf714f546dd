"""The DDIM transition as a Gaussian policy, with per-element log-probabilities.

Implements ALGORITHMS.md section 1 (DDPO, arXiv 2305.13301, built on DDIM,
arXiv 2010.02502 eq. 12 and 16). Symbols:

=================  ==========================================================
code               paper
=================  ==========================================================
``abar_t``         alpha-bar_t = alphas_cumprod[t]
``abar_prev``      alpha-bar at prev_t = t - 1000/T; alphas_cumprod[0] if prev_t < 0
``x0_hat``         predicted clean sample (epsilon, v or sample prediction)
``std``            sigma_t = eta * sqrt((1-abar_prev)/(1-abar_t) * (1-abar_t/abar_prev))
``mean``           mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps
``log_prob``       log N(x_{t-1}; mu, sigma_t^2 I), one value PER ELEMENT
=================  ==========================================================

The mean reproduces :meth:`diffusers.DDIMScheduler.step` with its default
``use_clipped_model_output=False`` exactly, with ``clip_sample`` and
``thresholding`` on or off (tests pin it): clipping or thresholding changes
x0_hat only, eps stays the model's. Unlike it, this function also returns
the element-wise log-density of the action, and accepts a different timestep
for each sample of the batch (training permutes timesteps per sample).

The last step (prev_t < 0) uses abar_prev = alphas_cumprod[0], as
ddpo-pytorch and ``set_alpha_to_one: false`` do. With ``set_alpha_to_one:
true`` (DDIMScheduler's default when a config lacks the key) diffusers uses
1.0, which makes sigma = 0 and the log-prob undefined (NaN); pxpo uses
alphas_cumprod[0] for both configs, so the last transition stays a Gaussian
with sigma > 0 (its mean then equals diffusers' step with
``set_alpha_to_one: false``).
"""

from __future__ import annotations

import torch

from ..errors import PxpoInputError
from .policy import PolicyBase, StepOutput, batch_randn, gaussian_log_prob

__all__ = ["DDIMPolicy", "StepOutput", "batch_randn", "check_eta", "ddim_step_with_logprob", "gaussian_log_prob"]


def _abar(scheduler, t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at integer timesteps t (any shape); alphas_cumprod[0] where t < 0.

    Not ``final_alpha_cumprod``: with ``set_alpha_to_one`` that is 1.0, and the
    last step's sigma would be 0 (module docstring).
    """
    ac = scheduler.alphas_cumprod.to(t.device)
    return torch.where(t >= 0, ac[t.clamp(min=0)], ac[0])


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding of x0_hat (B, C, h, w), as DDIMScheduler's ``thresholding``.

    s = clamp(quantile(|x0| per sample, ratio), 1, max_value); x0 -> clamp(x0, -s, s) / s.
    """
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    s = torch.quantile(flat.abs().double(), ratio, dim=1).to(x0.dtype)
    s = s.clamp(min=1, max=max_value).view((b,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def check_eta(eta: float, what: str = "sample.eta") -> None:
    """eta = 0 makes sigma_t = 0 and the log-prob undefined: refuse it for RL."""
    if not eta > 0:
        raise PxpoInputError(
            what,
            f"eta={eta} makes the DDIM step deterministic (sigma_t = 0), so its log-probability is undefined",
            "set eta > 0 for sampling that is trained on (1.0 is the usual choice)",
        )


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    num_inference_steps: int,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1} with its per-element log-probability.

    Args:
        scheduler: a diffusers DDIMScheduler (its ``alphas_cumprod``,
            ``final_alpha_cumprod`` and config: prediction_type, clip_sample,
            num_train_timesteps).
        model_output: guided UNet output, (B, C, h, w).
        timestep: t, an int or a (B,) integer tensor (one per sample).
        sample: x_t, (B, C, h, w).
        num_inference_steps: T; prev_t = t - num_train_timesteps // T.
        eta: DDIM stochasticity, > 0.
        prev_sample: the stored action x_{t-1} to score (training). If None,
            x_{t-1} = mean + std * z with z drawn from ``generator`` (on CPU, so
            a seed gives the same noise on every device).
        generator: torch.Generator, or a list of B (one per sample), for z.

    Returns:
        :class:`StepOutput`; ``prev_sample`` enters ``log_prob`` detached, so
        gradients flow only through ``mean`` (i.e. through the UNet).
    """
    check_eta(eta)
    b = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device).long()
    if t.ndim == 0:
        t = t.expand(b)
    cfg = scheduler.config
    prev_t = t - cfg.num_train_timesteps // num_inference_steps
    shape = (b,) + (1,) * (sample.ndim - 1)
    abar_t = _abar(scheduler, t).view(shape).to(torch.float32)
    abar_prev = _abar(scheduler, prev_t).view(shape).to(torch.float32)
    x = sample.float()
    out = model_output.float()

    if cfg.prediction_type == "epsilon":
        x0 = (x - (1 - abar_t).sqrt() * out) / abar_t.sqrt()
        eps = out
    elif cfg.prediction_type == "sample":
        x0 = out
        eps = (x - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = abar_t.sqrt() * x - (1 - abar_t).sqrt() * out
        eps = abar_t.sqrt() * out + (1 - abar_t).sqrt() * x
    else:
        raise PxpoInputError(
            "scheduler.prediction_type",
            f"unsupported prediction type {cfg.prediction_type!r}",
            "use a model trained with epsilon, v_prediction or sample prediction",
        )
    # Clip or threshold x0_hat only; eps stays the model's (diffusers' default
    # use_clipped_model_output=False, and ddpo-pytorch's).
    if getattr(cfg, "thresholding", False):
        x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    elif getattr(cfg, "clip_sample", False):
        r = cfg.clip_sample_range
        x0 = x0.clamp(-r, r)

    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        z = batch_randn(tuple(mean.shape), generator).to(mean.device)
        prev_sample = mean + std * z
    prev_sample = prev_sample.detach().float()
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample=prev_sample.to(sample.dtype), log_prob=log_prob, mean=mean, std=std)


class DDIMPolicy(PolicyBase):
    """Stochastic DDIM as a :class:`pxpo.core.policy.Policy`: every one of the T transitions is trained.

    Args:
        scheduler: a DDIMScheduler; ``set_timesteps(num_steps)`` is called here.
        num_steps: T; eta: > 0; guidance_scale: w (the same at sampling and training time).
    """

    scheduler_class = "DDIMScheduler"

    def __init__(self, scheduler, num_steps: int, eta: float, guidance_scale: float):
        check_eta(eta)
        self.scheduler, self.num_steps, self.eta, self.guidance_scale = scheduler, num_steps, eta, guidance_scale
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.detach().clone().long().cpu()
        self.trained_steps = torch.arange(num_steps)

    @classmethod
    def from_config(cls, sample_cfg, scheduler) -> DDIMPolicy:
        return cls(scheduler, sample_cfg.num_steps, sample_cfg.eta, sample_cfg.guidance_scale)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor):
        """The forward process at the timestep of step j (Diffusion-DPO, :mod:`pxpo.core.preference`).

        x0, noise (B, C, h, w); step_index (B,) -> x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, the
        network's regression target (its ``prediction_type``: noise, v or x0) and the timestep t (B,).
        """
        from .preference import diffuse

        t = self.timesteps.to(x0.device)[step_index.to(x0.device)]
        abar = self.scheduler.alphas_cumprod.to(x0.device)[t]
        x_t, target = diffuse(x0, noise, abar, self.scheduler.config.get("prediction_type", "epsilon"))
        return x_t, target, t

    def step(self, model_output, step_index, x_t, x_prev=None, generator=None) -> StepOutput:
        t = self.timesteps.to(x_t.device)[step_index.to(x_t.device)]
        return ddim_step_with_logprob(
            self.scheduler, model_output, t, x_t, self.num_steps, eta=self.eta, prev_sample=x_prev, generator=generator
        )
