"""Sampling trajectories with per-element log-probs (the policy's rollouts).

Shapes: N samples, T denoising steps, latents (C, h, w), text embeddings
(L tokens, D features), images (3, H, W) with H = h * vae_factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ddim import StepOutput, batch_randn, check_eta, ddim_step_with_logprob


@dataclass
class Rollout:
    """A batch of sampled trajectories.

    Attributes:
        latents: x_T .. x_0, (N, T+1, C, h, w), float32.
        log_probs: per-element log pi(x_{t-1} | x_t, c), (N, T, C, h, w), float32.
        timesteps: the scheduler timesteps t_1..t_T in sampling order, (T,) int64.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings as the UNet's ``encoder_hidden_states``: (B, L, D).

    Pads to ``tokenizer.model_max_length`` like Stable Diffusion pipelines.
    """
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def guided_model_output(
    unet,
    x: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """UNet output with classifier-free guidance, cond and uncond in ONE UNet call.

    Args:
        x: (B, C, h, w) noisy latents; t: int or (B,) timesteps.
        cond: (B, L, D) prompt embeddings; uncond: (B, L, D) or (1, L, D)
            negative-prompt embeddings, or None for no guidance.
        guidance_scale: w; eps = eps_u + w (eps_c - eps_u). w <= 1 or no
            ``uncond`` means a single conditional pass.

    Returns:
        (B, C, h, w) guided prediction (same parametrisation as the UNet).
    """
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(b)
    if uncond is None or guidance_scale <= 1.0:
        return unet(x, t, encoder_hidden_states=cond).sample
    uncond = uncond.expand(b, -1, -1)
    out = unet(
        torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])
    ).sample
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


@torch.no_grad()
def sample_ddim(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
) -> Rollout:
    """Sample N trajectories with stochastic DDIM, keeping every latent and log-prob.

    Args:
        unet: UNet2DConditionModel (eval mode).
        scheduler: DDIMScheduler; ``set_timesteps(num_steps)`` is called on it.
        cond: (N, L, D) prompt embeddings; uncond: (1 or N, L, D) or None.
        latent_shape: (C, h, w).
        num_steps: T; eta: > 0; guidance_scale: w.
        generator: CPU torch.Generator, or a list of N (one per sample), for
            x_T and every step's noise.

    Returns:
        :class:`Rollout` with latents (N, T+1, C, h, w), log_probs (N, T, C, h, w).
    """
    from tqdm.auto import tqdm

    check_eta(eta)
    n = cond.shape[0]
    device = cond.device
    dtype = unet.dtype
    scheduler.set_timesteps(num_steps, device=device)
    x = batch_randn((n, *latent_shape), generator).to(device) * scheduler.init_noise_sigma
    latents, log_probs = [x.float()], []
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        out = guided_model_output(unet, x.to(dtype), t, cond.to(dtype), None if uncond is None else uncond.to(dtype), guidance_scale)
        step = ddim_step_with_logprob(scheduler, out, t, x, num_steps, eta=eta, generator=generator)
        x = step.prev_sample.float()
        latents.append(x)
        log_probs.append(step.log_prob)
    return Rollout(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=scheduler.timesteps.detach().clone().long().cpu(),
    )


def step_log_prob(
    unet,
    scheduler,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_prev: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
) -> StepOutput:
    """Re-score stored actions under the current policy (training time).

    Args:
        x_t: (B, C, h, w); t: (B,) timesteps (may differ per sample);
        x_prev: stored x_{t-1}, (B, C, h, w); cond, uncond as in sampling
        (the SAME guidance scale and negative prompt as at sampling time).

    Returns:
        :class:`StepOutput` whose ``log_prob`` (B, C, h, w) carries gradients
        through the UNet.
    """
    out = guided_model_output(unet, x_t, t, cond, uncond, guidance_scale)
    return ddim_step_with_logprob(scheduler, out, t, x_t, num_steps, eta=eta, prev_sample=x_prev)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode x_0 latents (B, C, h, w) to images (B, 3, H, W) in [0, 1] (float32)."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    img = vae.decode(z).sample.float()
    return (img / 2 + 0.5).clamp(0, 1)
