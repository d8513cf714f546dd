"""Consistency-model policy (RLCM): golden values vs diffusers' LCMScheduler, I2-I4 on the tiny UNet."""

import copy

import pytest
import torch
from diffusers import LCMScheduler, LatentConsistencyModelPipeline

from pxpo.core.lcm import (
    boundary_scalings,
    guidance_embedding,
    lcm_model_output,
    lcm_step_with_logprob,
    prev_timesteps,
    sample_lcm,
)
from pxpo.core.sampling import encode_prompts


def _sched(**kw):
    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)


def test_boundary_scalings_formula():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 500]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    s, z = 0.5, 10.0
    assert c_skip[1].item() == pytest.approx(s**2 / (z**2 + s**2))
    assert c_out[2].item() == pytest.approx(5000 / (5000**2 + s**2) ** 0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoised_and_noise_match_diffusers(prediction_type):
    sched = _sched(prediction_type=prediction_type)
    ref = copy.deepcopy(sched)
    sched.set_timesteps(4)
    ref.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    prev = prev_timesteps(sched.timesteps.long())
    for j, t in enumerate(sched.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        noise_seed = 100 + j
        r = ref.step(out, t, x, generator=torch.Generator().manual_seed(noise_seed))
        mine = lcm_step_with_logprob(sched, out, t, prev[j], x, generator=torch.Generator().manual_seed(noise_seed))
        torch.testing.assert_close(mine.denoised, r.denoised, rtol=1e-5, atol=1e-5)
        if j < 3:  # diffusers re-noises all but the last step with the same law
            torch.testing.assert_close(mine.prev_sample, r.prev_sample, rtol=1e-5, atol=1e-5)


def test_log_prob_matches_normal_and_last_step_has_positive_std():  # (I4)
    sched = _sched()  # set_alpha_to_one=True: final_alpha_cumprod = 1
    sched.set_timesteps(4)
    x, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s = lcm_step_with_logprob(sched, out, sched.timesteps[-1], -1, x, generator=torch.Generator().manual_seed(0))
    assert (s.std > 0).all()
    ref = torch.distributions.Normal(s.mean, s.std.expand_as(s.mean)).log_prob(s.prev_sample)
    torch.testing.assert_close(s.log_prob, ref, rtol=1e-4, atol=1e-3)


def test_guidance_embedding_matches_diffusers():
    w = torch.tensor([0.5, 3.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(guidance_embedding(w, 32), ref)


@pytest.fixture(scope="module")
def lcm_setup(tiny_pipe):
    from diffusers import UNet2DConditionModel

    base = tiny_pipe.unet
    unet = UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=16)
    assert unet.config.time_cond_proj_dim == 16
    unet.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in unet.conv_out.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with torch.no_grad():
        cond = encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, ["a handwritten digit 1", "a handwritten digit 2"])
        neg = encode_prompts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [""])
    return unet, cond, neg


@pytest.mark.parametrize("w_embedding", [True, False])
def test_rollout_shapes_and_recomputed_log_probs(lcm_setup, tiny_pipe, w_embedding):  # (I3)
    unet, cond, neg = lcm_setup
    if not w_embedding:
        unet = tiny_pipe.unet
    sched = LCMScheduler.from_config(tiny_pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    roll, denoised = sample_lcm(unet, sched, cond, neg, latent_shape=(4, 8, 8), num_steps=4, guidance_scale=3.0, generator=gens)
    assert roll.latents.shape == (2, 5, 4, 8, 8) and roll.log_probs.shape == (2, 4, 4, 8, 8) and denoised.shape == (2, 4, 8, 8)
    prev = prev_timesteps(roll.timesteps)
    for j in range(4):
        with torch.no_grad():
            out = lcm_model_output(unet, roll.latents[:, j], roll.timesteps[j], cond, neg, 3.0)
            s = lcm_step_with_logprob(sched, out, roll.timesteps[j].expand(2), prev[j].expand(2), roll.latents[:, j], prev_sample=roll.latents[:, j + 1])
        torch.testing.assert_close(s.log_prob, roll.log_probs[:, j], rtol=1e-5, atol=1e-3)
        assert (torch.exp(s.log_prob - roll.log_probs[:, j]) - 1).abs().max() < 1e-3
        # (I2) the element mean is the per-sample Gaussian log-density mean
        ref = torch.distributions.Normal(s.mean, s.std.expand_as(s.mean)).log_prob(roll.latents[:, j + 1]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(roll.log_probs[:, j].mean(dim=(1, 2, 3)), ref, rtol=1e-4, atol=1e-3)


def test_w_embedding_unet_makes_one_single_batch_call(lcm_setup):
    unet, cond, neg = lcm_setup
    calls = []
    h = unet.register_forward_hook(lambda m, a, kw_out: calls.append(a[0].shape[0]))
    try:
        lcm_model_output(unet, torch.randn(2, 4, 8, 8), 500, cond, neg, 3.0)
    finally:
        h.remove()
    assert calls == [2]
