"""PXPO / DDPO losses: hand-computed values and invariant I1 (constant map == DDPO)."""

import math

import pytest
import torch

from pxpo.core.advantages import PerPromptStatTracker, to_latent_grid
from pxpo.core.losses import ddpo_loss, pxpo_loss


def test_sf_hand_computed():
    lp = torch.tensor([-1.0, -2.0])
    out = ddpo_loss(lp, lp, torch.tensor([1.0, -0.5]), mode="sf")
    # -mean(A * logp) = -((1)(-1) + (-0.5)(-2)) / 2 = 0
    assert out.loss.item() == pytest.approx(0.0)
    out = ddpo_loss(lp, lp, torch.tensor([2.0, 1.0]), mode="sf")
    assert out.loss.item() == pytest.approx(2.0)  # -((2)(-1) + (1)(-2)) / 2


def test_ppo_hand_computed_clipping():
    old = torch.zeros(3)
    lp = torch.log(torch.tensor([1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -2.0])
    out = ddpo_loss(lp, old, adv, mode="ppo", clip_range=0.2)
    # sample 0: A>0, r=1.5 -> max(-1.5, -1.2) = -1.2
    # sample 1: A>0, r=0.5 -> max(-0.5, -0.8) = -0.5
    # sample 2: A<0, r=1.05 -> max(2.1, 2.1) = 2.1
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.1) / 3, rel=1e-5)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * float((lp**2).mean()), rel=1e-5)


def test_advantage_clipping():
    lp = torch.tensor([-1.0])
    out = ddpo_loss(lp, lp, torch.tensor([100.0]), mode="sf", adv_clip_max=5.0)
    assert out.loss.item() == pytest.approx(5.0)


def _policy(theta, x, std=0.5):
    """Element log-probs of a toy Gaussian policy with mean theta (B, C, h, w)."""
    return -((x - theta) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("mode,ratio,perturb", [("sf", "element", 0.0), ("sf", "element", 0.3), ("ppo", "mean", 0.0), ("ppo", "mean", 0.3), ("ppo", "element", 0.0)])
def test_constant_map_equals_ddpo_loss_and_gradient(mode, ratio, perturb):  # (I1)
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 6, 4, 8, 8
    x = torch.randn(b, c, h, w, generator=g)
    theta0 = torch.randn(b, c, h, w, generator=g)
    old = _policy(theta0, x).detach()
    prompts = ["p", "q"] * 3
    scalar = torch.randn(b, generator=g)
    image_maps = scalar.view(b, 1, 1).expand(b, 16, 16).clone()

    adv_s = PerPromptStatTracker(16, 16).update(prompts, scalar)
    adv_m = PerPromptStatTracker(16, 16, baseline="position").update(prompts, to_latent_grid(image_maps, (h, w)))
    torch.testing.assert_close(adv_m, adv_s.view(b, 1, 1).expand(b, h, w), rtol=1e-5, atol=1e-5)

    theta_a = (theta0 + perturb * torch.randn(b, c, h, w, generator=g)).requires_grad_(True)
    theta_b = theta_a.detach().clone().requires_grad_(True)
    kw = dict(mode=mode, clip_range=0.05, adv_clip_max=5.0)
    la = pxpo_loss(_policy(theta_a, x), old, adv_m, ratio=ratio, **kw)
    lb = ddpo_loss(_policy(theta_b, x).mean(dim=(1, 2, 3)), old.mean(dim=(1, 2, 3)), adv_s, **kw)
    la.loss.backward()
    lb.loss.backward()
    torch.testing.assert_close(la.loss, lb.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theta_a.grad, theta_b.grad, rtol=1e-4, atol=1e-7)


def test_element_ratio_differs_from_mean_ratio_off_policy():
    """Per-element PPO is NOT DDPO once ratios move: the reason the clip range is tuned."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=g)
    old = _policy(torch.zeros_like(x), x)
    theta = torch.randn(2, 1, 4, 4, generator=g)
    adv = torch.tensor([1.0, -1.0])
    a = pxpo_loss(_policy(theta, x), old, adv, mode="ppo", ratio="element", clip_range=0.1)
    m = pxpo_loss(_policy(theta, x), old, adv, mode="ppo", ratio="mean", clip_range=0.1)
    assert not torch.isclose(a.loss, m.loss)


def test_pixel_weighting_pushes_each_location_by_its_advantage():
    """SF gradient w.r.t. each element's log-prob is -A_ij / (C h w): sign follows the map."""
    lp = torch.zeros(1, 2, 2, 2, requires_grad=True)
    adv = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]])
    pxpo_loss(lp, lp.detach(), adv, mode="sf").loss.backward()
    expected = -adv[:, None].expand(1, 2, 2, 2) / 8
    torch.testing.assert_close(lp.grad, expected)


@pytest.mark.parametrize("fn", ["pxpo", "ddpo"])
def test_far_off_policy_ratio_stays_finite(fn):
    """A log-ratio of 200 would overflow exp() to inf (and the loss to NaN with A < 0 vs A > 0)."""
    from pxpo.core.losses import ddpo_loss, pxpo_loss

    logp = torch.zeros(2, 4, 3, 3, requires_grad=True)
    old = torch.zeros(2, 4, 3, 3)
    old[0, 0, 0, 0] = -200.0  # ratio exp(200) = inf in float32
    old[1, 1, 1, 1] = 200.0  # ratio exp(-200) = 0
    adv = torch.tensor([-1.0, 1.0])
    if fn == "pxpo":
        out = pxpo_loss(logp, old, adv[:, None, None].expand(2, 3, 3), mode="ppo", clip_range=0.2, max_log_ratio=20.0)
    else:
        old = old * 0 + torch.tensor([-200.0, 200.0]).view(2, 1, 1, 1)
        out = ddpo_loss(logp, old, adv, mode="ppo", clip_range=0.2, max_log_ratio=20.0)
    assert torch.isfinite(out.loss) and torch.isfinite(out.ratio_mean)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
