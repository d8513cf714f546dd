"""Rectified-flow sampling as a Gaussian policy: Flow-GRPO's SDE (arXiv 2505.05470).

ALGORITHMS.md section 4. Rectified flow (SD3, FLUX): x_t = (1 - t) x_0 + t eps
with t in [0, 1] (t = 1 is noise; diffusers' FlowMatchEulerDiscreteScheduler
calls t "sigma"), the network predicts the velocity v = eps - x_0, and the
deterministic sampler is the Euler step x_{t+dt} = x_t + v dt, dt = t_next - t < 0.

Flow-GRPO (eq. 9-12 of the paper, ``sde_step_with_logprob`` in its reference
code) replaces the ODE by the reverse-time SDE with the same marginals; its
Euler-Maruyama step is a Gaussian policy:

=================  ==========================================================
code               paper
=================  ==========================================================
``sigma``          t = scheduler.sigmas[i];  ``sigma_next`` = sigmas[i + 1]
``dt``             sigma_next - sigma  (< 0)
``noise_level``    a (0.7 in Flow-GRPO's configs)
``sde_sigma``      sigma_t = a sqrt(t / (1 - t)); t = 1 in the denominator is
                   replaced by sigmas[1], the first step below 1 (as the reference)
``mean``           mu = x_t + [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)] dt
``std``            sigma_t sqrt(-dt)
``log_prob``       log N(x_{t+dt}; mu, std^2), one value PER ELEMENT
=================  ==========================================================

With a -> 0 the mean is the Euler step and std -> 0. The reference reduces the
log-prob with a mean over (C, h, w) (Flow-GRPO / DDPO); pxpo keeps it per
element, so a reward map can weight it (PXPO, ALGORITHMS.md section 2).

SDE window (Flow-GRPO-Fast, MixGRPO): only the steps ``window`` (indices into
the T steps) are SDE steps; the others are deterministic ODE steps, whose
stored log-prob is 0 and which are never trained. :func:`sde_window` builds it.

Model-specific part: :class:`SD3Denoiser` calls an
:class:`diffusers.SD3Transformer2DModel` (hidden_states (B, C, h, w), timestep =
1000 t, encoder_hidden_states (B, L, D) = CLIP hidden states and the T5 block,
pooled_projections (B, P) = the two CLIP pooled embeddings), classifier-free
guidance in ONE call (:class:`pxpo.core.policy.Denoiser`); :func:`encode_sd3` is
the pipeline's own prompt encoding. Everything else sees only ``velocity(x, sigma)``.
:class:`FlowSDEPolicy` (``sample.sampler: flow_sde``) is the policy the loop holds.
FLUX would need only another Denoiser, prompt encoder and schedule:

* :class:`diffusers.FluxTransformer2DModel` takes packed latents (B, h/2 * w/2,
  4 C) (``FluxPipeline._pack_latents``; unpack before the step or step on the
  packed tensor: the step is element-wise), ``img_ids`` / ``txt_ids``, timestep
  = t (not 1000 t), pooled_projections from CLIP, encoder_hidden_states from T5;
* FLUX.1-dev is guidance-distilled: one pass with ``guidance`` = w, no two-pass CFG;
* its schedule shifts with the image size: ``scheduler.set_timesteps(sigmas=
  linspace(1, 1/T, T), mu=calculate_shift(h/2 * w/2))`` (:func:`flow_sigmas` takes ``mu``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import PxpoInputError
from .policy import Cond, Denoiser, PolicyBase, Rollout, StepOutput, batch_randn, begin_step, gaussian_log_prob

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, C, h, w), sigma (B,)) -> v (B, C, h, w)


def flow_sigmas(scheduler, num_steps: int, device=None, mu: float | None = None) -> torch.Tensor:
    """The noise levels t_0 = 1 > t_1 > ... > t_T = 0 of a T-step schedule, (T+1,) float32.

    Calls ``scheduler.set_timesteps`` (a FlowMatchEulerDiscreteScheduler: its
    shift and, with ``mu``, the resolution-dependent shift FLUX uses).
    """
    kw = {"mu": mu} if mu is not None else {}
    scheduler.set_timesteps(num_steps, device=device, **kw)
    return scheduler.sigmas.detach().float().to(device)


def check_noise_level(noise_level: float, what: str = "sample.noise_level") -> None:
    """a = 0 makes every step deterministic and the log-prob undefined: refuse it for policy gradients."""
    if not noise_level > 0:
        raise PxpoInputError(
            what,
            f"noise level {noise_level} makes the flow SDE an ODE (std 0), so its log-probability is undefined",
            "set a noise level > 0 for sampling that is trained on with GRPO/PXPO (0.7 is Flow-GRPO's)",
        )


def sde_window(num_steps: int, start: int = 0, size: int = 0) -> tuple[int, ...]:
    """Indices of the SDE steps: ``size`` steps from ``start`` (size 0: all T steps)."""
    if size == 0:
        return tuple(range(num_steps))
    if start < 0 or size < 0 or start + size > num_steps:
        raise PxpoInputError(
            "sample.sde_window_start / sample.sde_window_size",
            f"a window of {size} steps from step {start} does not fit in {num_steps} steps",
            f"choose start + size <= sample.num_steps ({num_steps})",
        )
    return tuple(range(start, start + size))


def sde_sigma(sigma: torch.Tensor, sigma_max: float | torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient sigma_t = a sqrt(t / (1 - t)), with t = 1 replaced by sigma_max below the line."""
    denom = 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device), sigma)
    return noise_level * (sigma / denom).sqrt()


def _levels(sigmas: torch.Tensor, step_index, b: int, ndim: int):
    """(sigma, sigma_next) at step_index (int or (B,)), each shaped (B, 1, ..., 1)."""
    i = torch.as_tensor(step_index, device=sigmas.device).long()
    i = i.expand(b) if i.ndim == 0 else i
    shape = (b,) + (1,) * (ndim - 1)
    return sigmas[i].view(shape), sigmas[i + 1].view(shape)


def flow_ode_step(velocity: torch.Tensor, sigmas: torch.Tensor, step_index, sample: torch.Tensor) -> torch.Tensor:
    """The Euler step x_t + v dt (FlowMatchEulerDiscreteScheduler.step), float32, (B, C, h, w)."""
    sigma, sigma_next = _levels(sigmas.to(sample.device), step_index, sample.shape[0], sample.ndim)
    return sample.float() + velocity.float() * (sigma_next - sigma)


def flow_sde_step(
    velocity: torch.Tensor,
    sigmas: torch.Tensor,
    step_index,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator=None,
) -> StepOutput:
    """One Flow-GRPO SDE step x_t -> x_{t+dt} with its per-element log-probability.

    Args:
        velocity: the (guided) velocity prediction v, (B, C, h, w).
        sigmas: the schedule t_0..t_T, (T+1,) (:func:`flow_sigmas`).
        step_index: i, an int or a (B,) tensor (one per sample): t = sigmas[i].
        sample: x_t, (B, C, h, w).
        noise_level: a > 0.
        prev_sample: the stored action x_{t+dt} to score (training); None samples
            it as mean + std z, z from ``generator`` (one torch.Generator or a list
            of B, on CPU so a seed gives the same noise on every device).

    Returns:
        :class:`StepOutput` (prev_sample, log_prob and mean (B, C, h, w), std
        (B, 1, 1, 1)); the action enters ``log_prob`` detached, gradients flow
        through ``mean`` only.
    """
    check_noise_level(noise_level)
    sig = sigmas.to(sample.device).float()
    sigma, sigma_next = _levels(sig, step_index, sample.shape[0], sample.ndim)
    dt = sigma_next - sigma
    s_t = sde_sigma(sigma, sig[1] if sig.numel() > 1 else sig[0], noise_level)
    x, v = sample.float(), velocity.float()
    mean = x + (v + s_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = s_t * (-dt).sqrt()
    if prev_sample is None:
        prev_sample = mean + std * batch_randn(tuple(mean.shape), generator).to(mean.device)
    prev_sample = prev_sample.detach().float()
    return StepOutput(prev_sample=prev_sample, log_prob=gaussian_log_prob(prev_sample, mean, std), mean=mean, std=std)


class SD3Denoiser(Denoiser):
    """The SD3 transformer's velocity: hidden_states (B, C, h, w), timestep = 1000 t (float),
    encoder_hidden_states = ``cond.embeds`` (B, L, D), pooled_projections = ``cond.pooled`` (B, P).
    Classifier-free guidance (one call for cond and uncond) is :class:`Denoiser`'s."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, **kwargs).sample


def encode_sd3(pipe, prompts: Sequence[str], max_sequence_length: int = 256) -> Cond:
    """The :class:`Cond` of ``prompts`` for a StableDiffusion3Pipeline: its own ``encode_prompt``
    (CLIP-L and CLIP-G hidden states, the T5 block or zeros without T5, pooled CLIP embeddings), so
    sampling sees exactly what the stock pipeline does. embeds (B, 77 + 256, 4096) for SD3.5."""
    device = pipe.text_encoder.device
    embeds, _, pooled, _ = pipe.encode_prompt(
        list(prompts), None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    return Cond(embeds, pooled)


@torch.no_grad()
def sample_flow(
    velocity: Velocity,
    sigmas: torch.Tensor,
    x: torch.Tensor,
    *,
    noise_level: float,
    window: Sequence[int] | None = None,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll out T flow steps from x_T = x: SDE steps in ``window``, Euler ODE steps elsewhere.

    Args:
        velocity: (x (B, C, h, w), sigma (B,)) -> v, conditioning and guidance included.
        sigmas: (T+1,) schedule; x: (B, C, h, w) initial noise.
        window: indices of the SDE steps (default: all T).
        generator: torch.Generator or a list of B, for the SDE noise.

    Returns:
        latents (B, T+1, C, h, w) = x_T .. x_0, float32; log_probs (B, T, C, h, w),
        per element, 0 at ODE steps.
    """
    n_steps = sigmas.numel() - 1
    window = set(range(n_steps) if window is None else window)
    if window:
        check_noise_level(noise_level)
    b = x.shape[0]
    x = x.float()
    latents, log_probs = [x], []
    for i in range(n_steps):
        v = velocity(x, sigmas[i].expand(b))
        begin_step(generator, i)  # aligned pairs: B's noise branches from A's at step k
        if i in window:
            step = flow_sde_step(v, sigmas, i, x, noise_level, generator=generator)
            x, lp = step.prev_sample, step.log_prob
        else:
            x, lp = flow_ode_step(v, sigmas, i, x), torch.zeros_like(x)
        latents.append(x)
        log_probs.append(lp)
    return torch.stack(latents, 1), torch.stack(log_probs, 1)


class FlowSDEPolicy(PolicyBase):
    """Flow-GRPO's SDE sampler as a :class:`pxpo.core.policy.Policy` (SD3 transformers).

    Args:
        scheduler: a FlowMatchEulerDiscreteScheduler; ``set_timesteps(num_steps)`` is called here.
        num_steps: T. noise_level: a (0: every step is an ODE step, nothing to train by
            policy gradient; NFT can still train on the samples).
        guidance_scale: w, the same at sampling and training time.
        window: (start, size) of the SDE steps (size 0: all T), :func:`sde_window`.

    ``timesteps`` are round(1000 t) as int64 (the stored trajectory's record); the
    network gets the exact float 1000 t from ``sigmas`` (T+1,).
    """

    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, scheduler, num_steps: int, noise_level: float, guidance_scale: float, window: tuple[int, int] = (0, 0)):
        self.scheduler, self.noise_level, self.guidance_scale = scheduler, noise_level, guidance_scale
        self.sigmas = flow_sigmas(scheduler, num_steps).cpu()
        self.timestep_scale = float(scheduler.config.num_train_timesteps)
        self.timesteps = (self.sigmas[:-1] * self.timestep_scale).round().long()
        self.window = sde_window(num_steps, *window) if noise_level > 0 else ()
        self.trained_steps = torch.tensor(self.window, dtype=torch.long)

    @classmethod
    def from_config(cls, sample_cfg, scheduler) -> FlowSDEPolicy:
        s = sample_cfg
        return cls(scheduler, s.num_steps, s.noise_level, s.guidance_scale, (s.sde_window_start, s.sde_window_size))

    def denoiser(self, net, dtype: torch.dtype | None = None) -> Denoiser:
        return SD3Denoiser(net, dtype)

    def predict(self, denoiser: Denoiser, x_t, step_index: torch.Tensor, cond: Cond, uncond: Cond | None):
        t = self.sigmas.to(x_t.device)[step_index.to(x_t.device)] * self.timestep_scale
        return denoiser(x_t, t, cond, uncond, self.guidance_scale)

    def step(self, model_output, step_index, x_t, x_prev=None, generator=None) -> StepOutput:
        return flow_sde_step(model_output, self.sigmas, step_index, x_t, self.noise_level, prev_sample=x_prev, generator=generator)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor):
        """The forward process at level j of the schedule (Diffusion-DPO on a flow model, :mod:`pxpo.core.preference`).

        x0, noise (B, C, h, w); step_index (B,) -> x_t = (1 - t) x0 + t noise, the target velocity
        noise - x0, and the network's timestep 1000 t (B,), t = sigmas[j].
        """
        from .preference import flow_diffuse

        sigma = self.sigmas.to(x0.device)[step_index.to(x0.device)]
        x_t, target = flow_diffuse(x0, noise, sigma)
        return x_t, target, sigma * self.timestep_scale

    @torch.no_grad()
    def sample(self, denoiser, cond, uncond, latent_shape, generators, *, progress: bool = False) -> Rollout:
        """N trajectories: SDE steps in the window, Euler steps elsewhere (log-prob 0); x_T = N(0, I)."""
        n, device = len(cond), cond.embeds.device
        x = batch_randn((n, *latent_shape), generators).to(device)

        def velocity(z, sigma):
            return denoiser(z, sigma * self.timestep_scale, cond, uncond, self.guidance_scale)

        lat, lp = sample_flow(velocity, self.sigmas.to(device), x, noise_level=self.noise_level, window=self.window, generator=generators)
        return Rollout(lat, lp, self.timesteps.clone())
