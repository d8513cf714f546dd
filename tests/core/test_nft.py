"""Pixel-wise DiffusionNFT: the reference loss, I5 (constant map == scalar), gradient directions."""

import pytest
import torch

from pxpo.core.nft import forward_noise, nft_loss, optimality


def _batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, 4, 6, 6, generator=g), torch.randn(b, 4, 6, 6, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    x_t = forward_noise(x0, sigma, eps)
    v_old = (eps - x0) + 0.3 * torch.randn(b, 4, 6, 6, generator=g)
    v = (v_old + 0.1 * torch.randn(b, 4, 6, 6, generator=g)).requires_grad_(True)
    return v, v_old, x_t, x0, sigma


def test_forward_noise_and_optimality():
    x0, eps = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    assert forward_noise(x0, torch.tensor([0.25, 1.0]), eps).flatten().tolist() == [0.75, 0.0]
    assert optimality(torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0]), 5.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_scalar_loss_matches_the_reference_formula():
    """r pos / beta + (1 - r) neg / beta with per-sample means, times adv_clip_max (DiffusionNFT's code)."""
    v, v_old, x_t, x0, sigma = _batch()
    r = torch.tensor([0.9, 0.2, 0.5])
    beta, scale = 0.7, 5.0
    out = nft_loss(v, v_old, x_t, x0, sigma, r, beta=beta, loss_scale=scale)
    t = sigma.view(-1, 1, 1, 1)
    x0p = x_t - t * (beta * v + (1 - beta) * v_old)
    x0n = x_t - t * ((1 + beta) * v_old - beta * v)
    wp = (x0p - x0).abs().mean((1, 2, 3), keepdim=True).detach()
    wn = (x0n - x0).abs().mean((1, 2, 3), keepdim=True).detach()
    pos = ((x0p - x0) ** 2 / wp).mean((1, 2, 3))
    neg = ((x0n - x0) ** 2 / wn).mean((1, 2, 3))
    ref = ((r * pos / beta + (1 - r) * neg / beta) * scale).mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    g_out, = torch.autograd.grad(out.loss, v)
    g_ref, = torch.autograd.grad(ref, v)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-7)


def test_constant_map_gives_exactly_the_scalar_loss_and_gradient():  # (I5)
    v, v_old, x_t, x0, sigma = _batch(1)
    r = torch.tensor([0.8, 0.1, 0.55])
    scalar = nft_loss(v, v_old, x_t, x0, sigma, r)
    (g_s,) = torch.autograd.grad(scalar.loss, v)
    maps = r.view(3, 1, 1).expand(3, 6, 6).clone()
    pixel = nft_loss(v, v_old, x_t, x0, sigma, maps)
    (g_p,) = torch.autograd.grad(pixel.loss, v)
    assert torch.equal(scalar.loss, pixel.loss) and torch.equal(g_s, g_p)


def test_map_weights_each_element():
    """r = 1 on the left half, 0 on the right: the left is pulled to the target, the right pushed away."""
    v, v_old, x_t, x0, sigma = _batch(2, b=1)
    v = v_old.clone().requires_grad_(True)  # the first step of an epoch: v_theta = v_old
    r = torch.zeros(1, 6, 6)
    r[..., :3] = 1.0
    out = nft_loss(v, v_old, x_t, x0, sigma, r, beta=1.0)
    (g,) = torch.autograd.grad(out.loss, v)
    target = (x_t - x0) / sigma.view(-1, 1, 1, 1)  # v* = eps - x0
    step = -g  # gradient descent direction
    towards = (step * (target - v_old)).detach()
    assert towards[..., :3].sum() > 0 and towards[..., 3:].sum() < 0
    assert out.old_deviation.item() == 0.0


def test_r_one_descends_the_flow_matching_loss():
    v, v_old, x_t, x0, sigma = _batch(3)
    v = v_old.clone().requires_grad_(True)
    out = nft_loss(v, v_old, x_t, x0, sigma, torch.ones(3))
    (g,) = torch.autograd.grad(out.loss, v)
    target = (x_t - x0) / sigma.view(-1, 1, 1, 1)
    before = ((v - target) ** 2).mean()
    after = ((v - 1e-2 * g - target) ** 2).mean()
    assert after < before


@pytest.mark.parametrize("shape", [(3,), (3, 6, 6), (3, 4, 6, 6)])
def test_r_shapes(shape):
    v, v_old, x_t, x0, sigma = _batch(4)
    assert torch.isfinite(nft_loss(v, v_old, x_t, x0, sigma, torch.full(shape, 0.5)).loss)


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_velocity_kl_is_the_flow_sde_steps_kl(noise_level):
    """The NFT KL in velocity space equals the Gaussian KL of the two flow SDE steps from the same x_t (ALGORITHMS.md 4)."""
    from pxpo.core.flow import flow_sde_step
    from pxpo.core.kl import step_kl
    from pxpo.core.nft import velocity_kl

    g = torch.Generator().manual_seed(3)
    sigmas = torch.linspace(1.0, 0.0, 6)  # t = 1 at step 0: the SDE's std uses the first step below 1 there
    b = 5
    x = torch.randn(b, 4, 6, 6, generator=g)
    v, v_ref = torch.randn(b, 4, 6, 6, generator=g), torch.randn(b, 4, 6, 6, generator=g)
    j = torch.tensor([0, 1, 2, 3, 4])
    p = flow_sde_step(v, sigmas, j, x, noise_level, generator=torch.Generator().manual_seed(0))
    r = flow_sde_step(v_ref, sigmas, j, x, noise_level, prev_sample=p.prev_sample)
    want = step_kl(p, r)
    got = velocity_kl(v, v_ref, sigmas, j, noise_level)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(velocity_kl(v, v, sigmas, j, noise_level), torch.zeros_like(v))  # KL of a policy to itself: 0 (I7)
    with pytest.raises(Exception, match="noise level"):
        velocity_kl(v, v_ref, sigmas, j, 0.0)
