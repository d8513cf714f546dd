"""Multi-step consistency sampling as a Gaussian policy (RLCM, arXiv 2404.03673).

ALGORITHMS.md section 3. One step from x_t (t = timesteps[j]):

=================  ==========================================================
code               paper
=================  ==========================================================
``c_skip, c_out``  c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2), s = 0.5
``x0_hat``         clean-sample prediction from the UNet (epsilon, v or sample)
``denoised``       f_theta(x_t) = c_skip x_t + c_out x0_hat
``mean``           sqrt(abar_prev) f_theta(x_t)
``std``            sqrt(1 - abar_prev)   (fixed by the schedule)
``log_prob``       log N(x_next; mean, std^2), per element
=================  ==========================================================

prev_t is the next timestep of the schedule; for the LAST step it is < 0 and
abar_prev is the scheduler's final_alpha_cumprod, or alphas_cumprod[0] when
that is 1 (``set_alpha_to_one``), so every one of the n actions has a
log-prob. The reward is computed on the image decoded from the last
``denoised`` (f_theta output), not on the last noised sample, so the last
action (pure re-noising with std sqrt(1 - alphas_cumprod[0]) ~ 0.03) does not
influence the reward: its per-element log-prob only adds variance (its score
is ~1/0.03 times larger than the others'). The loss leaves it out
(:func:`trained_transitions`); the policy's horizon for training is n - 1. :func:`lcm_step_with_logprob`'s ``denoised`` equals
:meth:`diffusers.LCMScheduler.step`'s (tests pin it).
"""

from __future__ import annotations

import torch

from .policy import Cond, Denoiser, PolicyBase, StepOutput, batch_randn, gaussian_log_prob

LCMStepOutput = StepOutput  # prev_sample, log_prob, mean (B, C, h, w); std (B, 1, 1, 1); denoised: f_theta(x_t)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """(c_skip, c_out) of the consistency parametrisation at integer timesteps t."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def prev_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """The re-noising target of each step: the next timestep, and -1 after the last. (T,)"""
    return torch.cat([timesteps[1:], timesteps.new_tensor([-1])])


def final_abar(scheduler) -> float:
    """abar after the last step: final_alpha_cumprod, or alphas_cumprod[0] if that is 1 (std must be > 0)."""
    f = float(scheduler.final_alpha_cumprod)
    return float(scheduler.alphas_cumprod[0]) if f >= 1.0 else f


def trained_transitions(sampler: str, num_steps: int) -> int:
    """How many of a trajectory's transitions the loss trains on: the first ones.

    DDIM: all T. LCM: the first n - 1; the last re-noising comes after the
    f_theta output that is rewarded (module docstring). One-step LCM has no
    trainable transition and is refused.
    """
    if sampler != "lcm":
        return num_steps
    if num_steps < 2:
        from ..errors import PxpoInputError

        raise PxpoInputError(
            "sample.num_steps",
            "one-step consistency sampling has no action before the rewarded f_theta output, so nothing to train",
            "use sample.num_steps between 2 and 8 with sample.sampler=lcm",
        )
    return num_steps - 1


def lcm_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    prev_timestep: torch.Tensor | int,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator=None,
) -> LCMStepOutput:
    """One consistency step with re-noising, and the per-element log-prob of the re-noised sample.

    Args:
        scheduler: a diffusers LCMScheduler (alphas_cumprod, config).
        model_output: (guided) UNet output, (B, C, h, w).
        timestep, prev_timestep: ints or (B,) tensors; prev < 0 means the last step.
        sample: x_t, (B, C, h, w).
        prev_sample: the stored action to score; None samples it with ``generator``
            (one torch.Generator or a list of B).
    """
    b = sample.shape[0]
    dev = sample.device
    t = torch.as_tensor(timestep, device=dev).long()
    tp = torch.as_tensor(prev_timestep, device=dev).long()
    t = t.expand(b) if t.ndim == 0 else t
    tp = tp.expand(b) if tp.ndim == 0 else tp
    shape = (b,) + (1,) * (sample.ndim - 1)
    ac = scheduler.alphas_cumprod.to(dev)
    abar_t = ac[t].view(shape).float()
    abar_prev = torch.where(tp >= 0, ac[tp.clamp(min=0)], torch.tensor(final_abar(scheduler), device=dev)).view(shape).float()
    x = sample.float()
    out = model_output.float()
    cfg = scheduler.config
    if cfg.prediction_type == "epsilon":
        x0 = (x - (1 - abar_t).sqrt() * out) / abar_t.sqrt()
    elif cfg.prediction_type == "sample":
        x0 = out
    elif cfg.prediction_type == "v_prediction":
        x0 = abar_t.sqrt() * x - (1 - abar_t).sqrt() * out
    else:
        raise ValueError(f"unsupported prediction type {cfg.prediction_type!r}")
    if getattr(cfg, "clip_sample", False):
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    c_skip, c_out = boundary_scalings(t, getattr(cfg, "timestep_scaling", 10.0))
    denoised = c_out.view(shape) * x0 + c_skip.view(shape) * x
    mean = abar_prev.sqrt() * denoised
    std = (1 - abar_prev).sqrt()
    if prev_sample is None:
        prev_sample = mean + std * batch_randn(tuple(mean.shape), generator).to(dev)
    prev_sample = prev_sample.detach().float()
    return LCMStepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, denoised)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales w (B,) -> (B, dim) (LCM's w-conditioning, as in VDM)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class LCMDenoiser(Denoiser):
    """The UNet call of a consistency step.

    With a w-embedding UNet (``config.time_cond_proj_dim`` set): one pass with
    ``timestep_cond`` = embedding of (guidance_scale - 1), as diffusers' LCM
    pipeline does. Otherwise two-pass classifier-free guidance batched in one call.
    """

    def __call__(self, x, t, cond, uncond=None, guidance_scale=1.0, **kwargs):
        dim = getattr(self.config, "time_cond_proj_dim", None)
        if not dim:
            return super().__call__(x, t, cond, uncond, guidance_scale, **kwargs)
        b = x.shape[0]
        dtype = self.dtype or x.dtype
        wc = guidance_embedding(torch.full((b,), guidance_scale - 1.0, device=x.device), dim).to(dtype)
        return super().__call__(x, t, cond, None, 1.0, timestep_cond=wc, **kwargs)


def lcm_model_output(unet, x, t, cond, uncond, guidance_scale: float):
    """UNet output for a consistency step (:class:`LCMDenoiser`); cond (B, L, D), uncond (1 or B, L, D) or None."""
    return LCMDenoiser(unet)(x, t, Cond(cond), None if uncond is None else Cond(uncond), guidance_scale)


class LCMPolicy(PolicyBase):
    """Multi-step consistency sampling as a :class:`pxpo.core.policy.Policy` (RLCM).

    Transition j re-noises f_theta(x_{t_j}) to the next timestep; the last one
    (after the rewarded f_theta output) is sampled and stored but not trained
    (:func:`trained_transitions`). ``Rollout.final`` is the last f_theta output.
    """

    scheduler_class = "LCMScheduler"

    def __init__(self, scheduler, num_steps: int, guidance_scale: float):
        self.scheduler, self.num_steps, self.guidance_scale = scheduler, num_steps, guidance_scale
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.detach().clone().long().cpu()
        self.prev = prev_timesteps(self.timesteps)

    @classmethod
    def from_config(cls, sample_cfg, scheduler) -> LCMPolicy:
        return cls(scheduler, sample_cfg.num_steps, sample_cfg.guidance_scale)

    @property
    def trained_steps(self) -> torch.Tensor:
        return torch.arange(trained_transitions("lcm", len(self.timesteps)))

    def denoiser(self, net, dtype=None) -> LCMDenoiser:
        return LCMDenoiser(net, dtype)

    def step(self, model_output, step_index, x_t, x_prev=None, generator=None) -> StepOutput:
        dev = x_t.device
        j = step_index.to(dev)
        t, tp = self.timesteps.to(dev)[j], self.prev.to(dev)[j]
        return lcm_step_with_logprob(self.scheduler, model_output, t, tp, x_t, prev_sample=x_prev, generator=generator)


@torch.no_grad()
def sample_lcm(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    guidance_scale: float,
    generator=None,
):
    """Sample N trajectories of n consistency steps with per-element log-probs (:class:`LCMPolicy`).

    Returns:
        (Rollout with latents (N, n+1, C, h, w) = x_T, re-noised x_{t_2}, ...,
        the last action; log_probs (N, n, C, h, w); timesteps (n,)),
        denoised (N, C, h, w): the last f_theta output, which is decoded for the reward.
    """
    policy = LCMPolicy(scheduler, num_steps, guidance_scale)
    roll = policy.sample(
        policy.denoiser(unet, unet.dtype), Cond(cond), None if uncond is None else Cond(uncond), latent_shape, generator
    )
    return roll, roll.final
