"""Rollouts: sample the policy with per-element log-probs, and label the images.

Sampling is not training: ``pxpo sample``, ``pxpo label``, ``pxpo evaluate``
and the online loop all call these functions; none of them needs the
optimiser.

* :func:`sample_seed` -- the noise seed of one sample (run seed, epoch,
  stream, global index), so resumed, staged and multi-process runs draw
  identical samples.
* :func:`sample_trajectories` -- roll out the policy (any
  :class:`pxpo.core.policy.Policy`: DDIM, LCM, ...) with classifier-free
  guidance, in compute batches, decode the images -> :class:`Trajectories`.
* :func:`label_images` -- images -> checked reward maps.
"""

from __future__ import annotations

import torch

from .compute_batch import ComputeBatch
from ..config import Config
from ..core.policies import make_policy
from ..core.policy import BranchingGenerators, Cond, Policy
from ..core.sampling import decode_latents, encode_cond, latent_hw
from ..trajectories import Trajectories, check_reward_maps, make_meta, quantize_images


def sample_seed(seed: int, epoch: int, process: int, index: int) -> int:
    """The noise seed of one sample: a function of (run seed, epoch, stream, index) only,
    so a resumed run draws exactly the samples an uninterrupted one would.

    Training samples use stream (``process``) 0 and the sample's GLOBAL index
    in the epoch, so sample i is the same however many processes run."""
    return ((seed * 1_000_003 + epoch) * 1_009 + process) * 100_003 + index


@torch.no_grad()
def sample_trajectories(
    pipe,
    cfg: Config,
    prompts: list[str],
    seeds: list[int],
    *,
    progress=False,
    batch_size: int | None = None,
    policy: Policy | None = None,
    compute: ComputeBatch | None = None,
    network=None,
    pairs: bool | None = None,
) -> Trajectories:
    """Roll out the policy for ``prompts`` (one sample each, noise from ``seeds``).

    Args:
        policy: the run's policy (default: built from ``cfg.sample`` and ``pipe.scheduler``).
        batch_size: the algorithm's batch (default ``sample.batch_size``; a
            process of N rolls out ``sample.batch_size / N``): the UNet batch
            unless ``compute`` (default: from ``sample.compute_batch``) says
            otherwise. Each sample's noise comes from its own seed, so the
            batching does not change the samples.
        network: what the denoiser calls instead of ``pipe.unet`` (a torch.compile'd UNet).
        pairs: sample aligned pairs (:func:`pair_generators`); default ``sample.pairs``.

    Returns:
        :class:`Trajectories` with latents (N, T+1, C, h, w), log_probs
        (N, T, C, h, w), images (N, 3, H, W) quantised to 8 bits.
    """
    s = cfg.sample
    unet = pipe.unet
    device = unet.device
    policy = policy if policy is not None else make_policy(s, pipe.scheduler)
    compute = compute if compute is not None else ComputeBatch(s.compute_batch, device, "sample.compute_batch")
    denoiser = policy.denoiser(network if network is not None else unet, unet.dtype)
    was_training = unet.training
    unet.eval()
    neg = encode_cond(pipe, [cfg.prompts.negative_prompt], negative=True, max_sequence_length=s.max_sequence_length)
    latent_shape = (unet.config.in_channels, *latent_hw(unet.config))

    pairs = s.pairs if pairs is None else pairs
    if pairs:
        check_pairs(prompts)

    def roll(c: slice):
        cond = encode_cond(pipe, prompts[c], max_sequence_length=s.max_sequence_length)
        gens = pair_generators(seeds, c, s.pair_shared_steps) if pairs else [torch.Generator().manual_seed(sd) for sd in seeds[c]]
        r = policy.sample(denoiser, cond, neg, latent_shape, gens, progress=progress)
        # the reward is on Rollout.final (RLCM: the last f_theta output, not the last noised sample)
        images = quantize_images(decode_latents(pipe.vae, r.final.to(device)))
        return r, cond.to("cpu", torch.float32), images.cpu()

    parts = compute.run(len(prompts), batch_size or s.batch_size, roll)
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
    if pairs:  # samples 2p (A) and 2p + 1 (B) are pair p (docs/trajectory-format.md)
        meta["pairs"] = {"shared_steps": s.pair_shared_steps}
    conds = Cond.cat([p[1] for p in parts])
    neg = neg.to("cpu", torch.float32)
    return Trajectories(
        latents=torch.cat([p[0].latents.cpu() for p in parts]),
        log_probs=torch.cat([p[0].log_probs.cpu() for p in parts]),
        timesteps=policy.timesteps.clone(),
        prompt_embeds=conds.embeds,
        negative_prompt_embeds=neg.embeds,
        prompts=list(prompts),
        seeds=list(seeds),
        images=torch.cat([p[2] for p in parts]),
        meta=meta,
        pooled_prompt_embeds=conds.pooled,
        negative_pooled_prompt_embeds=neg.pooled,
        time_ids=conds.time_ids,
        negative_time_ids=neg.time_ids,
    )


def check_pairs(prompts: list[str]) -> None:
    """Aligned pairs need an even number of samples, 2p and 2p + 1 of one prompt (``sample.pairs``)."""
    from ..errors import PxpoInputError

    if len(prompts) % 2:
        raise PxpoInputError("sample.pairs", f"{len(prompts)} samples cannot form whole pairs", "sample an even number per process (sample.batch_size)")
    bad = [p for p in range(len(prompts) // 2) if prompts[2 * p] != prompts[2 * p + 1]]
    if bad:
        raise PxpoInputError("sample.pairs", f"pairs {bad[:5]} have two different prompts", "draw prompts in groups of sample.prompt_group (an even group)")


def pair_generators(seeds: list[int], rows: slice, shared_steps: int) -> BranchingGenerators:
    """The noise generators of samples ``rows`` of an aligned-pair rollout (``sample.pairs``).

    Sample 2p (A) draws from its own seed. Sample 2p + 1 (B) starts from A's seed (the same initial
    noise and the same noise in its first ``shared_steps`` steps) and switches to its own seed at step
    ``shared_steps``, where the two trajectories branch (:class:`pxpo.core.policy.BranchingGenerators`).
    Rows are global indices of ``seeds``, so any batching gives the same samples.
    """
    gens, branches = [], {}
    for r, i in enumerate(range(rows.start or 0, rows.stop)):
        gens.append(torch.Generator().manual_seed(seeds[i - 1] if i % 2 else seeds[i]))
        if i % 2:
            branches[r] = (shared_steps, seeds[i])
    return BranchingGenerators(gens, branches)


def label_images(labeller, images: torch.Tensor, prompts: list[str], where: str = "reward labeller") -> tuple[torch.Tensor, dict]:
    """Score images (N, 3, H, W) -> maps (N, H, W), checked for shape and finiteness."""
    maps, info = labeller(images, prompts)
    check_reward_maps(maps, images.shape[0], tuple(images.shape[-2:]), where)
    return maps.float(), info
