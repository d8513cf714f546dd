"""Rollouts with per-element log-probs on the tiny pipeline: shapes, I2, I3, CFG, seeds."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from pxpo.core.sampling import encode_prompts, sample_ddim, step_log_prob

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 3"]


@pytest.fixture(scope="module")
def setup(tiny_pipe):
    pipe = tiny_pipe
    # A non-trivial UNet: perturb the (near-zero at init) output conv.
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in unet.conv_out.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with torch.no_grad():
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS)
        neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return unet, pipe.scheduler, cond, neg, shape


def _roll(setup, sched=None, steps=5, guidance=3.0, eta=1.0, seeds=(1, 2, 3)):
    unet, scheduler, cond, neg, shape = setup
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(seeds)
    return sample_ddim(
        unet, sched or scheduler, cond[:n], neg, latent_shape=shape, num_steps=steps, eta=eta, guidance_scale=guidance, generator=gens
    )


def test_shapes(setup):
    r = _roll(setup, steps=5)
    assert r.latents.shape == (3, 6, 4, 8, 8)
    assert r.log_probs.shape == (3, 5, 4, 8, 8)
    assert r.timesteps.shape == (5,)
    assert torch.isfinite(r.log_probs).all()


def _schedulers(base):
    yield "ddim-leading-eps", DDIMScheduler.from_config(base.config)
    yield "ddim-trailing-eps", DDIMScheduler.from_config(base.config, timestep_spacing="trailing")
    yield "ddim-vpred", DDIMScheduler.from_config(base.config, prediction_type="v_prediction")
    yield "ddim-clip", DDIMScheduler.from_config(base.config, clip_sample=True, clip_sample_range=1.0)


@pytest.mark.parametrize("which", ["ddim-leading-eps", "ddim-trailing-eps", "ddim-vpred", "ddim-clip"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_recomputed_log_prob_equals_stored(setup, which, guidance):  # (I3)
    unet, base, cond, neg, _ = setup
    sched = dict(_schedulers(base))[which]
    r = _roll(setup, sched=sched, steps=6, guidance=guidance, eta=0.8)
    for j in range(6):
        with torch.no_grad():
            out = step_log_prob(
                unet,
                sched,
                r.latents[:, j],
                r.timesteps[j].expand(3),
                r.latents[:, j + 1],
                cond,
                neg,
                num_steps=6,
                eta=0.8,
                guidance_scale=guidance,
            )
        torch.testing.assert_close(out.log_prob, r.log_probs[:, j], rtol=1e-5, atol=1e-4)
        ratio = torch.exp(out.log_prob - r.log_probs[:, j])
        assert (ratio - 1).abs().max() < 1e-4


def test_permuted_timesteps_in_one_batch(setup):  # training mixes timesteps within a micro-batch
    unet, sched, cond, neg, _ = setup
    r = _roll(setup, steps=6)
    tj = torch.tensor([5, 0, 3])
    idx = torch.arange(3)
    with torch.no_grad():
        out = step_log_prob(
            unet, sched, r.latents[idx, tj], r.timesteps[tj], r.latents[idx, tj + 1], cond, neg, num_steps=6, eta=1.0, guidance_scale=3.0
        )
    torch.testing.assert_close(out.log_prob, r.log_probs[idx, tj], rtol=1e-5, atol=1e-4)


def test_element_mean_equals_ddpo_per_sample_log_prob(setup):  # (I2)
    """DDPO's reference reduces log N(x_prev; mu, sigma) with a mean over (C, h, w)."""
    unet, sched, cond, neg, _ = setup
    r = _roll(setup, steps=4)
    j = 2
    t = int(r.timesteps[j])
    with torch.no_grad():
        x = r.latents[:, j]
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg.expand(3, -1, -1), cond])).sample
        u, c = out.chunk(2)
        eps = u + 3.0 * (c - u)
    # independent DDPO-style computation from the schedule
    a_t = sched.alphas_cumprod[t]
    prev = t - 1000 // 4
    a_p = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    mu = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps
    ddpo = torch.distributions.Normal(mu, std).log_prob(r.latents[:, j + 1]).mean(dim=(1, 2, 3))
    torch.testing.assert_close(r.log_probs[:, j].mean(dim=(1, 2, 3)), ddpo, rtol=1e-4, atol=1e-4)


def test_cfg_is_one_unet_call_per_step(setup):
    unet, sched, cond, neg, shape = setup
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        @property
        def dtype(self):
            return self.inner.dtype

        def forward(self, x, t, encoder_hidden_states):
            calls.append(x.shape[0])
            return self.inner(x, t, encoder_hidden_states=encoder_hidden_states)

    sample_ddim(Counting(unet), sched, cond, neg, latent_shape=shape, num_steps=4, eta=1.0, guidance_scale=5.0)
    assert calls == [6, 6, 6, 6]  # cond + uncond batched: 2 x 3 samples, one call per step


def test_each_sample_reproducible_from_its_seed(setup):
    unet, sched, cond, neg, shape = setup
    full = _roll(setup, steps=3, seeds=(11, 22, 33))
    alone = sample_ddim(
        unet, sched, cond[1:2], neg, latent_shape=shape, num_steps=3, eta=1.0, guidance_scale=3.0, generator=[torch.Generator().manual_seed(22)]
    )
    torch.testing.assert_close(alone.latents[0], full.latents[1], rtol=1e-3, atol=1e-3)  # batched-matmul rounding
    other = _roll(setup, steps=3, seeds=(11, 23, 33))
    assert not torch.allclose(other.latents[1], full.latents[1])
