"""Rollouts: sample the policy with per-element log-probs, and label the images.

Sampling is not training: ``pxpo sample``, ``pxpo label``, ``pxpo evaluate``
and the online loop all call these functions; none of them needs the
optimiser.

* :func:`sample_seed` -- the noise seed of one sample (run seed, epoch,
  stream, global index), so resumed, staged and multi-process runs draw
  identical samples.
* :func:`sample_trajectories` -- roll out the policy (DDIM or LCM) with
  classifier-free guidance, decode the images -> :class:`Trajectories`.
* :func:`label_images` -- images -> checked reward maps.
"""

from __future__ import annotations

import torch

from .config import Config
from .core.lcm import sample_lcm
from .core.sampling import decode_latents, encode_prompts, sample_ddim
from .trajectories import Trajectories, check_reward_maps, make_meta, quantize_images


def sample_seed(seed: int, epoch: int, process: int, index: int) -> int:
    """The noise seed of one sample: a function of (run seed, epoch, stream, index) only,
    so a resumed run draws exactly the samples an uninterrupted one would.

    Training samples use stream (``process``) 0 and the sample's GLOBAL index
    in the epoch, so sample i is the same however many processes run."""
    return ((seed * 1_000_003 + epoch) * 1_009 + process) * 100_003 + index


@torch.no_grad()
def sample_trajectories(
    pipe, cfg: Config, prompts: list[str], seeds: list[int], *, progress=False, batch_size: int | None = None
) -> Trajectories:
    """Roll out the policy for ``prompts`` (one sample each, noise from ``seeds``).

    ``batch_size`` samples per UNet batch (default ``sample.batch_size``; a
    process of N rolls out ``sample.batch_size / N``). Each sample's noise comes
    from its own seed, so the batching does not change the samples.

    Returns:
        :class:`Trajectories` with latents (N, T+1, C, h, w), log_probs
        (N, T, C, h, w), images (N, 3, H, W) quantised to 8 bits.
    """
    s = cfg.sample
    unet, device = pipe.unet, pipe.unet.device
    was_training = unet.training
    unet.eval()
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.prompts.negative_prompt])
    c = unet.config.in_channels
    size = unet.config.sample_size
    latent_shape = (c, size, size) if isinstance(size, int) else (c, *size)
    parts = []
    chunk = batch_size or s.batch_size
    for i in range(0, len(prompts), chunk):
        batch_prompts = prompts[i : i + chunk]
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, batch_prompts)
        gens = [torch.Generator().manual_seed(sd) for sd in seeds[i : i + chunk]]
        if s.sampler == "lcm":
            roll, final = sample_lcm(
                unet, pipe.scheduler, cond, neg, latent_shape=latent_shape, num_steps=s.num_steps, guidance_scale=s.guidance_scale, generator=gens
            )
        else:
            roll = sample_ddim(
                unet,
                pipe.scheduler,
                cond,
                neg,
                latent_shape=latent_shape,
                num_steps=s.num_steps,
                eta=s.eta,
                guidance_scale=s.guidance_scale,
                generator=gens,
                progress=progress,
            )
            final = roll.latents[:, -1]
        # RLCM: the reward is on the last f_theta output (`final`), not the last noised sample.
        images = quantize_images(decode_latents(pipe.vae, final.to(device)))
        parts.append((roll, cond.float().cpu(), images.cpu()))
    unet.train(was_training)
    meta = make_meta(
        model_path=cfg.model.path,
        revision=cfg.model.revision,
        scheduler_config=pipe.scheduler.config,
        num_steps=s.num_steps,
        eta=s.eta,
        guidance_scale=s.guidance_scale,
        negative_prompt=cfg.prompts.negative_prompt,
        sampler=s.sampler,
    )
    return Trajectories(
        latents=torch.cat([p[0].latents.cpu() for p in parts]),
        log_probs=torch.cat([p[0].log_probs.cpu() for p in parts]),
        timesteps=parts[0][0].timesteps,
        prompt_embeds=torch.cat([p[1] for p in parts]),
        negative_prompt_embeds=neg.float().cpu(),
        prompts=list(prompts),
        seeds=list(seeds),
        images=torch.cat([p[2] for p in parts]),
        meta=meta,
    )


def label_images(labeller, images: torch.Tensor, prompts: list[str], where: str = "reward labeller") -> tuple[torch.Tensor, dict]:
    """Score images (N, 3, H, W) -> maps (N, H, W), checked for shape and finiteness."""
    maps, info = labeller(images, prompts)
    check_reward_maps(maps, images.shape[0], tuple(images.shape[-2:]), where)
    return maps.float(), info
