"""Region-level preferences (issue 24): the two losses reduce EXACTLY to D3PO and Diffusion-DPO with m = +1
(loss and gradients against whole-image implementations written here), and the map weights act only where m != 0."""

import math

import pytest
import torch
import torch.nn.functional as F

from pxpo.core.preference import (
    aligned_pairs, diffuse, expand_to_samples, flow_diffuse, pairs_are_aligned, pool_preferences, preference_accuracy,
    preference_from_maps, region_d3po_loss, region_dpo_loss,
)

K, C, H, W = 3, 4, 2, 3


def _gauss_logp(x, mu, std):
    return -((x - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _transitions(seed=0):
    """Stored actions of A and B, a 'network' theta giving means, and a fixed reference mean."""
    g = torch.Generator().manual_seed(seed)
    x_a, x_b = torch.randn(K, C, H, W, generator=g), torch.randn(K, C, H, W, generator=g)
    ref_a, ref_b = torch.randn(K, C, H, W, generator=g), torch.randn(K, C, H, W, generator=g)
    theta = (torch.randn(2, K, C, H, W, generator=g) * 0.3).requires_grad_(True)
    std = torch.rand(K, 1, 1, 1, generator=g) + 0.2
    return x_a, x_b, ref_a, ref_b, theta, std


def _d3po_whole(x_a, x_b, ref_a, ref_b, theta, std, beta):
    """D3PO (arXiv 2311.13231) as its code writes it: DDPO's log-prob is the MEAN over (C, h, w) of the
    per-element Gaussian log-density; loss = -log sigmoid(beta (log-ratio_A - log-ratio_B)), ratio to the reference."""
    lp = lambda x, mu: _gauss_logp(x, mu, std).mean(dim=(1, 2, 3))  # noqa: E731
    ratio_a = lp(x_a, ref_a + theta[0]) - lp(x_a, ref_a)
    ratio_b = lp(x_b, ref_b + theta[1]) - lp(x_b, ref_b)
    return -torch.log(torch.sigmoid(beta * ratio_a - beta * ratio_b)).mean()


def _d3po_region(x_a, x_b, ref_a, ref_b, theta, std, beta, m):
    d_a = _gauss_logp(x_a, ref_a + theta[0], std) - _gauss_logp(x_a, ref_a, std)
    d_b = _gauss_logp(x_b, ref_b + theta[1], std) - _gauss_logp(x_b, ref_b, std)
    return region_d3po_loss(d_a, d_b, m, beta)


def test_constant_map_plus_one_is_d3po_exactly_loss_and_gradients():
    args = _transitions()
    beta = 0.7
    whole = _d3po_whole(*args, beta)
    region = _d3po_region(*args, beta, torch.ones(K, H, W)).loss
    torch.testing.assert_close(region, whole, rtol=1e-6, atol=1e-7)
    g_whole, = torch.autograd.grad(whole, args[4])
    g_region, = torch.autograd.grad(_d3po_region(*args, beta, torch.ones(K, H, W)).loss, args[4])
    assert g_whole.abs().sum() > 0
    torch.testing.assert_close(g_region, g_whole, rtol=1e-5, atol=1e-8)


def test_minus_one_swaps_a_and_b_and_zero_is_no_signal():
    x_a, x_b, ref_a, ref_b, theta, std = _transitions(1)
    swapped = _d3po_whole(x_b, x_a, ref_b, ref_a, theta.flip(0), std, 0.5)
    torch.testing.assert_close(_d3po_region(x_a, x_b, ref_a, ref_b, theta, std, 0.5, -torch.ones(K, H, W)).loss, swapped)
    zero = _d3po_region(x_a, x_b, ref_a, ref_b, theta, std, 0.5, torch.zeros(K, H, W))
    torch.testing.assert_close(zero.loss, torch.tensor(math.log(2.0)))
    g, = torch.autograd.grad(zero.loss, theta)
    assert torch.count_nonzero(g) == 0


def test_the_map_acts_only_where_it_is_nonzero():
    """A map that prefers A on the left column only: no gradient reaches the other columns' elements."""
    x_a, x_b, ref_a, ref_b, theta, std = _transitions(2)
    m = torch.zeros(K, H, W)
    m[:, :, 0] = 1.0
    g, = torch.autograd.grad(_d3po_region(x_a, x_b, ref_a, ref_b, theta, std, 1.0, m).loss, theta)
    assert torch.count_nonzero(g[..., 1:]) == 0 and torch.count_nonzero(g[..., 0]) > 0


def _dpo_reference_code(pred, pred_ref, target, beta_dpo):
    """Diffusion-DPO's training code (arXiv 2311.12908), winners first then losers in the batch."""
    model_losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    ref_losses = (pred_ref - target).pow(2).mean(dim=[1, 2, 3])
    ref_w, ref_l = ref_losses.chunk(2)
    inside = -0.5 * beta_dpo * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean()


def test_constant_map_plus_one_is_diffusion_dpo_exactly_loss_and_gradients():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2 * K, C, H, W, generator=g)
    pred_ref = target + 0.1 * torch.randn(2 * K, C, H, W, generator=g)
    theta = (pred_ref + 0.01 * torch.randn(2 * K, C, H, W, generator=g)).requires_grad_(True)
    beta_dpo = 50.0
    whole = _dpo_reference_code(theta, pred_ref, target, beta_dpo)
    err = (theta - target) ** 2 - (pred_ref - target) ** 2
    region = region_dpo_loss(err[:K], err[K:], torch.ones(K, H, W), 0.5 * beta_dpo)
    torch.testing.assert_close(region.loss, whole, rtol=1e-6, atol=1e-7)
    g_whole, = torch.autograd.grad(whole, theta)
    err = (theta - target) ** 2 - (pred_ref - target) ** 2
    g_region, = torch.autograd.grad(region_dpo_loss(err[:K], err[K:], torch.ones(K, H, W), 0.5 * beta_dpo).loss, theta)
    assert g_whole.abs().sum() > 0
    torch.testing.assert_close(g_region, g_whole, rtol=1e-5, atol=1e-9)
    # the oriented margin is > 0 where the policy lowered A's error relative to B's
    model = ((theta - target) ** 2).mean((1, 2, 3)).detach()
    ref = ((pred_ref - target) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(region.margin, -((model[:K] - model[K:]) - (ref[:K] - ref[K:])), rtol=1e-5, atol=1e-9)


def test_preference_maps_from_two_reward_maps_are_scaled_and_clipped():
    a = torch.tensor([[[0.9, 0.1], [0.5, 0.0]]])
    b = torch.tensor([[[0.1, 0.9], [0.4, 0.0]]])
    torch.testing.assert_close(preference_from_maps(a, b, 2.0), torch.tensor([[[1.0, -1.0], [0.2, 0.0]]]))
    pooled = pool_preferences(torch.ones(1, 8, 8).tril(), (2, 2))
    assert pooled.shape == (1, 2, 2) and pooled[0, 0, 0] == pytest.approx(10 / 16) and pooled[0, 0, 1] == 0  # area means of 4x4 blocks


def test_expansion_accuracy_and_pair_checks():
    maps = torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), -1.0)])
    rows = expand_to_samples(maps, torch.tensor([[0, 1], [4, 5]]), 6)
    assert torch.equal(rows[1], maps[0]) and torch.equal(rows[4], maps[1]) and rows[2:4].abs().sum() == 0  # pair 1 unlabelled
    assert pairs_are_aligned(aligned_pairs(6), 6) and not pairs_are_aligned(torch.tensor([[1, 2]]), 6)
    assert not pairs_are_aligned(torch.tensor([[0, 1], [0, 1]]), 6)
    acc = preference_accuracy(torch.tensor([1.0, -1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert acc.item() == pytest.approx(0.5)  # one right, one wrong, one tie (1/2), the unlabelled one left out


def test_forward_processes():
    x0, noise = torch.randn(2, C, H, W), torch.randn(2, C, H, W)
    abar = torch.tensor([0.81, 0.36])
    x_t, tgt = diffuse(x0, noise, abar, "epsilon")
    torch.testing.assert_close(x_t[1], 0.6 * x0[1] + 0.8 * noise[1]) and torch.testing.assert_close(tgt, noise)
    _, v = diffuse(x0, noise, abar, "v_prediction")
    torch.testing.assert_close(v[0], 0.9 * noise[0] - math.sqrt(0.19) * x0[0])
    x_t, tgt = flow_diffuse(x0, noise, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0]) and torch.testing.assert_close(tgt, noise - x0)
