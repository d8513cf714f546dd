"""DDIM transition as a Gaussian policy: golden values vs diffusers, I4, eta checks."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from pxpo.core.ddim import ddim_step_with_logprob, gaussian_log_prob
from pxpo.errors import PxpoInputError


def _sched(**kw):
    cfg = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def test_gaussian_log_prob_matches_torch_normal():  # (I4)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, 5, 5, generator=g)
    sigma = torch.rand(4, 1, 1, 1, generator=g) + 0.05
    x = mu + sigma * torch.randn(4, 3, 5, 5, generator=g) * 2
    ref = torch.distributions.Normal(mu, sigma.expand_as(mu)).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mu, sigma), ref, rtol=1e-5, atol=1e-5)


def test_hand_computed_log_prob():
    # log N(1; 0, 2^2) = -1/8 - log 2 - log(2 pi)/2
    v = gaussian_log_prob(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0))
    assert math.isclose(v.item(), -0.125 - math.log(2) - 0.5 * math.log(2 * math.pi), rel_tol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_step_matches_diffusers_ddim(prediction_type, spacing):
    sched = _sched(prediction_type=prediction_type, timestep_spacing=spacing)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        z = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        mine = ddim_step_with_logprob(sched, out, t, x, 10, eta=1.0, prev_sample=ref)
        # our mean + std * z reproduces diffusers' sample
        torch.testing.assert_close(mine.mean + mine.std * z, ref, rtol=1e-4, atol=1e-5)


def test_log_prob_of_own_sample_is_density_of_noise():
    sched = _sched()
    sched.set_timesteps(20)
    x = torch.randn(3, 4, 8, 8)
    out = torch.randn(3, 4, 8, 8)
    s = ddim_step_with_logprob(sched, out, sched.timesteps[5], x, 20, eta=1.0, generator=torch.Generator().manual_seed(0))
    z = (s.prev_sample - s.mean) / s.std
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z) - torch.log(s.std)
    torch.testing.assert_close(s.log_prob, ref, rtol=1e-4, atol=1e-4)


def test_per_sample_timesteps_equal_separate_calls():
    sched = _sched()
    sched.set_timesteps(20)
    x = torch.randn(3, 4, 8, 8)
    out = torch.randn(3, 4, 8, 8)
    prev = torch.randn(3, 4, 8, 8)
    ts = sched.timesteps[[0, 7, 19]]
    batched = ddim_step_with_logprob(sched, out, ts, x, 20, eta=0.7, prev_sample=prev)
    for i in range(3):
        one = ddim_step_with_logprob(sched, out[i : i + 1], ts[i], x[i : i + 1], 20, eta=0.7, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_last_step_uses_alphas_cumprod_0(set_alpha_to_one):
    """Both configs: the last step's abar_prev is alphas_cumprod[0], sigma > 0, log-prob finite."""
    sched = _sched(set_alpha_to_one=set_alpha_to_one)
    sched.set_timesteps(20)
    t_last = sched.timesteps[-1]  # 1 with leading spacing: prev_t < 0
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    s = ddim_step_with_logprob(sched, out, t_last, x, 20, eta=1.0, generator=g)
    abar_t, abar_prev = sched.alphas_cumprod[t_last], sched.alphas_cumprod[0]
    expected = math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    assert math.isclose(s.std.flatten()[0].item(), expected, rel_tol=1e-5)
    assert expected > 0 and torch.isfinite(s.log_prob).all()
    # the mean is diffusers' step with set_alpha_to_one=False, whatever the config says
    ref_sched = _sched(set_alpha_to_one=False)
    ref_sched.set_timesteps(20)
    ref = ref_sched.step(out, t_last, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(s.mean + s.std * z, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", ["clip_sample", "no_clip", "thresholding"])
def test_mean_matches_diffusers_default_with_clipping(prediction_type, clip):
    """clip_sample / thresholding change x0_hat only (use_clipped_model_output=False)."""
    kw = {"clip_sample": clip == "clip_sample", "thresholding": clip == "thresholding"}
    if clip == "thresholding":
        kw.update(dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    sched = _sched(prediction_type=prediction_type, clip_sample_range=1.0, **kw)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    for t in sched.timesteps:
        # large outputs so x0_hat leaves [-1, 1] and clipping / thresholding acts
        x = 3 * torch.randn(2, 4, 8, 8, generator=g)
        out = 3 * torch.randn(2, 4, 8, 8, generator=g)
        z = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        mine = ddim_step_with_logprob(sched, out, t, x, 10, eta=1.0, prev_sample=ref)
        torch.testing.assert_close(mine.mean + mine.std * z, ref, rtol=1e-4, atol=1e-4)


def test_gradient_flows_through_mean_only():
    sched = _sched()
    sched.set_timesteps(10)
    out = torch.randn(2, 4, 4, 4, requires_grad=True)
    prev = torch.randn(2, 4, 4, 4, requires_grad=True)
    s = ddim_step_with_logprob(sched, out, sched.timesteps[3], torch.randn(2, 4, 4, 4), 10, prev_sample=prev)
    s.log_prob.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert prev.grad is None


@pytest.mark.parametrize("eta", [0.0, -1.0])
def test_eta_zero_is_rejected(eta):
    sched = _sched()
    sched.set_timesteps(10)
    with pytest.raises(PxpoInputError, match="eta"):
        ddim_step_with_logprob(sched, torch.zeros(1, 1, 2, 2), 500, torch.zeros(1, 1, 2, 2), 10, eta=eta)
