"""Flow-GRPO's SDE step as a Gaussian policy: pinned oracle, ODE equivalence, I4, I6, windows, CFG."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pxpo.core.flow import (
    FlowSDEPolicy,
    SD3Denoiser,
    encode_sd3,
    flow_ode_step,
    flow_sde_step,
    flow_sigmas,
    sample_flow,
    sde_sigma,
    sde_window,
)
from pxpo.core.policies import make_policy
from pxpo.core.policy import Policy
from pxpo.errors import PxpoInputError


def _sigmas(steps=10, shift=3.0):
    return flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=shift), steps)


def test_sigmas_run_from_one_to_zero():
    s = _sigmas(10)
    assert s.shape == (11,) and s[0].item() == 1.0 and s[-1].item() == 0.0 and (s[1:] < s[:-1]).all()


def test_pinned_oracle_log_prob_of_a_stored_transition():
    """One element, every quantity recomputed by hand from the paper's formulas (Python floats)."""
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    x_t, v, x_next, a = 0.3, -0.7, 0.1, 0.7
    out = flow_sde_step(torch.tensor([[v]]), sigmas, 1, torch.tensor([[x_t]]), a, prev_sample=torch.tensor([[x_next]]))
    t, t_next = 0.8, 0.5
    dt = t_next - t
    s_t = a * math.sqrt(t / (1 - t))  # 1.4
    mean = x_t + (v + s_t**2 / (2 * t) * (x_t + (1 - t) * v)) * dt
    std = s_t * math.sqrt(-dt)
    logp = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert out.mean.item() == pytest.approx(mean, rel=1e-6)
    assert out.std.item() == pytest.approx(std, rel=1e-6)
    assert out.log_prob.item() == pytest.approx(logp, rel=1e-6)
    # pinned by hand: s_t^2 = 0.49 * 4 = 1.96; mean = 0.3 + (-0.7 + 1.225 * 0.16) * (-0.3) = 0.4512; std^2 = 1.96 * 0.3
    assert (mean, std**2) == (pytest.approx(0.4512), pytest.approx(0.588))
    assert out.log_prob.item() == pytest.approx(-0.7583066, abs=1e-6)


def test_first_step_replaces_t_equal_one_in_the_denominator():
    sigmas = _sigmas(4)
    s0 = sde_sigma(sigmas[:1], sigmas[1], 0.7)
    assert s0.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - sigmas[1].item())), rel=1e-6)
    out = flow_sde_step(torch.zeros(2, 4, 3, 3), sigmas, 0, torch.randn(2, 4, 3, 3), 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.std).all()


def test_ode_step_is_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = flow_sigmas(sched, 6)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        x, v = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
        ref = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(flow_ode_step(v, sigmas, i, x), ref.float(), rtol=1e-5, atol=1e-6)


def test_log_prob_matches_torch_normal_at_every_step():  # (I4)
    sigmas = _sigmas(8)
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        x, v, x_next = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
        out = flow_sde_step(v, sigmas, i, x, 0.7, prev_sample=x_next)
        ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(x_next)
        torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)


def test_per_element_log_prob_has_variance_one_half_per_step():  # (I6)
    """x ~ N(mu, s^2): var of log N(x; mu, s^2) = var(z^2) / 4 = 1/2, and its mean is -1/2 - log s - log(2 pi)/2."""
    sigmas = _sigmas(10)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 32, 32, generator=g)
    for i in range(10):
        v = torch.randn(x.shape, generator=g)
        out = flow_sde_step(v, sigmas, i, x, 0.7, generator=g)
        lp = out.log_prob
        assert lp.var().item() == pytest.approx(0.5, abs=0.02), f"step {i}"
        expected_mean = -0.5 - torch.log(out.std).mean().item() - 0.5 * math.log(2 * math.pi)
        assert lp.mean().item() == pytest.approx(expected_mean, abs=0.01)
        x = out.prev_sample


def test_vanishing_noise_level_gives_the_euler_step():  # (I6)
    sigmas = _sigmas(5)
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for i in range(5):
        out = flow_sde_step(v, sigmas, i, x, 1e-6, prev_sample=x)
        torch.testing.assert_close(out.mean, flow_ode_step(v, sigmas, i, x), rtol=1e-5, atol=1e-5)


def test_per_sample_step_indices_equal_separate_calls():
    sigmas = _sigmas(6)
    x, v, nxt = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    idx = torch.tensor([0, 3, 5])
    batched = flow_sde_step(v, sigmas, idx, x, 0.7, prev_sample=nxt)
    for k in range(3):
        one = flow_sde_step(v[k : k + 1], sigmas, int(idx[k]), x[k : k + 1], 0.7, prev_sample=nxt[k : k + 1])
        torch.testing.assert_close(batched.log_prob[k : k + 1], one.log_prob)


def test_sde_keeps_the_ode_marginals_on_a_gaussian():
    """x_0 ~ N(0, s0^2): the exact velocity is linear; the SDE's samples at every level have the
    forward-process variance (1 - t)^2 s0^2 + t^2, like the ODE's (Flow-GRPO's claim, up to discretisation)."""
    s0 = 0.5
    sigmas = flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=1.0), 100)

    def velocity(x, t):  # E[eps - x_0 | x_t] for Gaussian x_0
        t = t.view(-1, 1)
        return x * (t - (1 - t) * s0**2) / ((1 - t) ** 2 * s0**2 + t**2)

    x = torch.randn(40_000, 1, generator=torch.Generator().manual_seed(3))
    lat, lp = sample_flow(velocity, sigmas, x, noise_level=0.7, generator=torch.Generator().manual_seed(4))
    for i in (25, 50, 75, 100):
        t = sigmas[i].item()
        assert lat[:, i].var().item() == pytest.approx((1 - t) ** 2 * s0**2 + t**2, rel=0.05), f"level {t}"
    assert lp.shape == (40_000, 100, 1)


def test_window_makes_ode_steps_outside_with_zero_log_prob():
    sigmas = _sigmas(6)
    x = torch.randn(2, 4, 4, 4)
    vel = lambda z, t: 0.3 * z + t.view(-1, 1, 1, 1)  # noqa: E731
    window = sde_window(6, start=1, size=2)
    lat, lp = sample_flow(vel, sigmas, x, noise_level=0.7, window=window, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        if i in window:
            assert (lp[:, i] != 0).all()
        else:
            assert (lp[:, i] == 0).all()
            torch.testing.assert_close(lat[:, i + 1], flow_ode_step(vel(lat[:, i], sigmas[i].expand(2)), sigmas, i, lat[:, i]))
    assert sde_window(6) == tuple(range(6))
    with pytest.raises(PxpoInputError, match="does not fit"):
        sde_window(6, start=5, size=2)


def test_zero_noise_level_is_refused_for_sde_steps():
    with pytest.raises(PxpoInputError, match="noise level"):
        flow_sde_step(torch.zeros(1, 1), _sigmas(3), 0, torch.zeros(1, 1), 0.0)


@pytest.fixture(scope="module")
def tiny_sd3():
    from pxpo.embedded.sd3 import make_tiny_sd3_pipeline

    pipe = make_tiny_sd3_pipeline(seed=0)
    with torch.no_grad():  # random init gives a near-zero output layer: make predictions non-trivial
        torch.manual_seed(0)
        for p in pipe.transformer.proj_out.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        cond = encode_sd3(pipe, ["a handwritten digit 3", "a handwritten digit 7"])
        neg = encode_sd3(pipe, [""])
    return pipe, cond, neg


def test_encode_sd3_is_the_pipelines_encoding(tiny_sd3):
    pipe, cond, _ = tiny_sd3
    e, _, p, _ = pipe.encode_prompt(["a handwritten digit 3", "a handwritten digit 7"], None, None, do_classifier_free_guidance=False)
    assert torch.equal(cond.embeds, e) and torch.equal(cond.pooled, p)


def test_sd3_denoiser_guidance_is_one_call(tiny_sd3):
    pipe, cond, neg = tiny_sd3
    tr = pipe.transformer
    den = SD3Denoiser(tr)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 400.0])
    calls = []
    h = tr.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        guided = den(x, t, cond, neg, 4.0)
        c = den(x, t, cond)
        u = den(x, t, neg.expand(2))
        direct = tr(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled).sample
    h.remove()
    assert len(calls) == 4  # one per call, CFG included
    torch.testing.assert_close(guided, u + 4.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert torch.equal(c, direct)


def _policy(pipe, **kw):
    s = SimpleNamespace(**{"num_steps": 6, "noise_level": 0.7, "guidance_scale": 4.0, "sde_window_start": 1, "sde_window_size": 2, **kw})
    return make_policy(SimpleNamespace(sampler="flow_sde", **vars(s)), FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_policy_recomputes_the_stored_window_log_probs(tiny_sd3, guidance):  # (I3 for flow, I6)
    pipe, cond, neg = tiny_sd3
    pol = _policy(pipe, guidance_scale=guidance)
    assert isinstance(pol, FlowSDEPolicy) and isinstance(pol, Policy)
    assert pol.trained_steps.tolist() == [1, 2] and pol.timesteps.dtype == torch.int64 and pol.timesteps[0] == 1000
    den = pol.denoiser(pipe.transformer)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    roll = pol.sample(den, cond, neg, (4, 8, 8), gens)
    assert roll.latents.shape == (2, 7, 4, 8, 8) and roll.log_probs.shape == (2, 6, 4, 8, 8)
    assert (roll.log_probs[:, [0, 3, 4, 5]] == 0).all() and (roll.log_probs[:, [1, 2]] != 0).all()
    assert torch.equal(roll.final, roll.latents[:, -1])
    j = torch.tensor([2, 1])  # per-sample transitions, as training permutes them
    with torch.no_grad():
        out = pol.log_prob(den, roll.latents[[0, 1], j], j, roll.latents[[0, 1], j + 1], cond, neg)
    stored = roll.log_probs[[0, 1], j]
    torch.testing.assert_close(out.log_prob, stored, rtol=1e-4, atol=1e-4)
    assert torch.exp(out.log_prob - stored).sub(1).abs().max() < 1e-3
    again = pol.sample(den, cond, neg, (4, 8, 8), [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(again.latents, roll.latents)  # a sample is a function of its seed


def test_zero_noise_level_samples_the_ode_and_trains_nothing(tiny_sd3):
    pipe, cond, neg = tiny_sd3
    pol = _policy(pipe, noise_level=0.0)
    assert pol.trained_steps.numel() == 0
    roll = pol.sample(pol.denoiser(pipe.transformer), cond, neg, (4, 8, 8), [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert (roll.log_probs == 0).all() and torch.isfinite(roll.latents).all()
