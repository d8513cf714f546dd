"""Prompt encoding, decoding, and the DDIM policy as plain functions over tensors.

The loop uses a :class:`pxpo.core.policy.Policy` (:func:`pxpo.core.policies.make_policy`);
:func:`sample_ddim`, :func:`step_log_prob` and :func:`guided_model_output` are
the same computations for callers holding bare tensors (tests, benchmarks).

Shapes: N samples, T denoising steps, latents (C, h, w), text embeddings
(L tokens, D features), pooled embeddings (P), images (3, H, W) with
H = h * vae_factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ddim import DDIMPolicy, StepOutput
from .policy import Cond, Denoiser, Rollout

__all__ = ["Rollout", "decode_latents", "encode_cond", "encode_prompts", "guided_model_output", "sample_ddim", "step_log_prob"]


def _token_ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings as the UNet's ``encoder_hidden_states``: (B, L, D).

    Pads to ``tokenizer.model_max_length`` like Stable Diffusion pipelines.
    """
    return text_encoder(_token_ids(tokenizer, prompts, text_encoder.device))[0]


def encode_sdxl(pipe, prompts: Sequence[str], image_hw: tuple[int, int]) -> Cond:
    """SDXL's conditioning, as :meth:`diffusers.StableDiffusionXLPipeline.encode_prompt` builds it.

    embeds: both encoders' penultimate hidden states concatenated, (B, L, D1 + D2);
    pooled: text_encoder_2's projected pooled output, (B, P); time_ids: (B, 6) =
    (H, W) original size, (0, 0) crop, (H, W) target size in pixels.
    """
    hidden, pooled = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        if tok is None or enc is None:
            continue
        out = enc(_token_ids(tok, prompts, enc.device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds (text_encoder_2)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    h, w = image_hw
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=embeds.device).expand(len(prompts), 6)
    return Cond(embeds, pooled, time_ids)


def encode_cond(pipe, prompts: Sequence[str], *, negative: bool = False, max_sequence_length: int = 256) -> Cond:
    """The :class:`Cond` of ``prompts`` (B rows) for ``pipe``'s model family.

    SD 1.x/2.x: ``embeds`` only. SD3: :func:`pxpo.core.flow.encode_sd3` (embeds, pooled; ``max_sequence_length``
    T5 tokens, ``sample.max_sequence_length``). SDXL (a ``text_encoder_2`` and a UNet with
    ``addition_embed_type: text_time``): :func:`encode_sdxl`; with ``negative``
    and an empty negative prompt, zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` is set, as diffusers' SDXL pipeline does.
    """
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_3"):  # SD3: the pipeline's own encoding
        from .flow import encode_sd3

        return encode_sd3(pipe, prompts, max_sequence_length)
    unet = getattr(pipe, "unet", None)
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time":
        hw = tuple(s * pipe.vae_scale_factor for s in latent_hw(unet.config))
        c = encode_sdxl(pipe, prompts, hw)
        if negative and all(p == "" for p in prompts) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            c = Cond(torch.zeros_like(c.embeds), torch.zeros_like(c.pooled), c.time_ids)
        return c
    return Cond(encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))


def latent_hw(net_config) -> tuple[int, int]:
    """(h, w) of the latents a network's config declares (``sample_size``: int or pair)."""
    size = net_config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _cond(x: torch.Tensor | Cond | None) -> Cond | None:
    return x if x is None or isinstance(x, Cond) else Cond(x)


def guided_model_output(unet, x, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """UNet output with classifier-free guidance, cond and uncond in ONE call (:class:`pxpo.core.policy.Denoiser`).

    x: (B, C, h, w); t: int or (B,); cond: (B, L, D) or a Cond; uncond: (1 or B, L, D), a Cond or None.
    """
    return Denoiser(unet)(x, t, _cond(cond), _cond(uncond), guidance_scale)


@torch.no_grad()
def sample_ddim(
    unet,
    scheduler,
    cond,
    uncond,
    *,
    latent_shape: tuple[int, int, int],
    num_steps: int,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
) -> Rollout:
    """Sample N trajectories with stochastic DDIM, keeping every latent and log-prob (:class:`DDIMPolicy`).

    Args:
        unet: UNet2DConditionModel (eval mode).
        scheduler: DDIMScheduler; ``set_timesteps(num_steps)`` is called on it.
        cond: (N, L, D) prompt embeddings or a Cond; uncond: (1 or N, L, D), a Cond, or None.
        latent_shape: (C, h, w). num_steps: T; eta: > 0; guidance_scale: w.
        generator: CPU torch.Generator, or a list of N (one per sample).

    Returns:
        :class:`Rollout` with latents (N, T+1, C, h, w), log_probs (N, T, C, h, w).
    """
    policy = DDIMPolicy(scheduler, num_steps, eta, guidance_scale)
    return policy.sample(policy.denoiser(unet, unet.dtype), _cond(cond), _cond(uncond), latent_shape, generator, progress=progress)


def step_log_prob(unet, scheduler, x_t, t, x_prev, cond, uncond, *, num_steps: int, eta: float, guidance_scale: float) -> StepOutput:
    """Re-score stored actions under the current policy (training time).

    Args:
        x_t: (B, C, h, w); t: (B,) scheduler timesteps (may differ per sample);
        x_prev: stored x_{t-1}, (B, C, h, w); cond, uncond as in sampling.

    Returns:
        :class:`StepOutput` whose ``log_prob`` (B, C, h, w) carries gradients.
    """
    from .ddim import ddim_step_with_logprob

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
