"""Gradient attribution: pixel credit for a differentiable scalar reward (pxpo.core.rewards.attribution)."""

import pytest
import torch

from pxpo.core import rewards as R
from pxpo.core.advantages import PerPromptStatTracker, to_latent_grid
from pxpo.core.losses import ddpo_loss, pxpo_loss
from pxpo.errors import PxpoInputError


def _images(b=3, h=16, w=16, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _weights(h=16, w=16, seed=1):
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


def _linear(weights):
    return lambda x, p: (x * weights).sum(dim=(1, 2, 3))


def _smooth(weights):
    """A nonlinear, differentiable reward (a squashed weighted sum)."""
    return lambda x, p: torch.tanh((x * weights).sum(dim=(1, 2, 3)) / 20.0) + (x[:, 1] ** 2).mean(dim=(1, 2))


@pytest.mark.parametrize("method", ["gradient", "integrated"])
@pytest.mark.parametrize("patch", [1, 3, 4])
def test_each_map_has_the_reward_as_its_mean(method, patch):
    x, fn = _images(), _smooth(_weights())
    maps, r = R.attribution_map(fn, x, ["a"] * 3, method=method, patch=patch)
    assert maps.shape == (3, 16, 16) and maps.dtype == torch.float32
    torch.testing.assert_close(r, fn(x, None).double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(maps.double().mean((1, 2)), r, rtol=1e-6, atol=1e-6)
    assert maps.std((1, 2)).min() > 0  # credit is not uniform


@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_linear_reward_patch_one_equals_occlusion(fill):
    """For a linear reward, gradient x input with the occlusion fill as baseline is exactly the drop of each pixel."""
    x, fn = _images(2, 8, 8), _linear(_weights(8, 8))
    grad_map, _ = R.attribution_map(fn, x, ["a", "b"], patch=1, fill=fill)
    occ_map = R.occlusion_map(fn, x, ["a", "b"], patch=1, fill=fill)
    torch.testing.assert_close(grad_map, occ_map, rtol=1e-4, atol=1e-4)


def test_window_sum_is_the_first_order_occlusion_drop_of_the_window():
    """Linear reward, patch 4: on occlusion's grid, the window around a patch's pixels sums that patch
    (the window anchored at the patch's top-left + (patch-1)//2 pixel is the patch itself)."""
    x, fn = _images(2, 16, 16), _linear(_weights())
    grad_map, _ = R.attribution_map(fn, x, ["a", "b"], patch=4, fill=0.5)
    occ_map = R.occlusion_map(fn, x, ["a", "b"], patch=4, fill=0.5)
    # the window of pixel (y0 + 1, x0 + 1) is rows y0..y0+3, cols x0..x0+3: occlusion's patch. The maps' offsets
    # differ (occlusion centres on the patches' drops, attribution on every pixel's window), their differences do not.
    g, o = grad_map[:, 1::4, 1::4], occ_map[:, ::4, ::4]
    torch.testing.assert_close(g - g[:, :1, :1], o - o[:, :1, :1], rtol=1e-4, atol=1e-4)


def test_integrated_gradients_are_complete():
    """sum_p a_p -> r(x) - r(x') (completeness); gradient x input is the k = 1 case."""
    x, fn = _images(), _smooth(_weights())
    base = torch.full_like(x, 0.5)
    a, r = R.pixel_attribution(fn, x, ["a"] * 3, method="integrated", steps=64, fill=0.5)
    torch.testing.assert_close(a.sum((1, 2)), (fn(x, None) - fn(base, None)).double(), rtol=0, atol=2e-3)
    g, _ = R.pixel_attribution(fn, x, ["a"] * 3, method="integrated", steps=1, fill=0.5)
    torch.testing.assert_close(g, R.pixel_attribution(fn, x, ["a"] * 3, fill=0.5)[0])


def test_chunks_give_the_same_maps():
    x, fn = _images(5), _smooth(_weights())
    whole, _ = R.attribution_map(fn, x, ["a"] * 5)
    torch.testing.assert_close(R.attribution_map(fn, x, ["a"] * 5, max_batch=2)[0], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,ratio,perturb", [("sf", "element", 0.1), ("ppo", "mean", 0.1), ("ppo", "element", 0.0)])
def test_constant_attribution_gives_ddpo(mode, ratio, perturb):  # (I1) through the attribution adapter
    """A constant attribution gives the constant map r, so PXPO's advantages and loss are DDPO's on r.

    r(x) = sum log x: gradient x input with fill 0 is x * (1 / x) = 1 per value, 3 per pixel, uniform.
    """
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 6, 4, 8, 8
    x = 0.1 + 0.9 * torch.rand(b, 3, 16, 16, generator=g)
    prompts = ["p", "q"] * 3
    fn = R.make_labeller("attribution", base=lambda im, p: im.log().sum((1, 2, 3)), patch=1, fill=0.0)
    maps, info = fn(x, prompts)
    r = torch.tensor(info["scalar"])
    torch.testing.assert_close(maps, r.float()[:, None, None].expand(b, 16, 16), rtol=1e-6, atol=1e-4)

    adv_s = PerPromptStatTracker(16, 16).update(prompts, r)
    adv_m = PerPromptStatTracker(16, 16, baseline="position").update(prompts, to_latent_grid(maps, (h, w)))
    torch.testing.assert_close(adv_m, adv_s.view(b, 1, 1).expand(b, h, w), rtol=1e-4, atol=1e-4)

    z = torch.randn(b, c, h, w, generator=g)
    old = -(z**2) / 2
    theta_a = (perturb * torch.randn(b, c, h, w, generator=g)).requires_grad_(True)  # PPO per element is DDPO on-policy only
    theta_b = theta_a.detach().clone().requires_grad_(True)
    kw = dict(mode=mode, clip_range=0.05, adv_clip_max=5.0)
    la = pxpo_loss(-((z - theta_a) ** 2) / 2, old, adv_m, ratio=ratio, **kw)
    lb = ddpo_loss((-((z - theta_b) ** 2) / 2).mean(dim=(1, 2, 3)), old.mean(dim=(1, 2, 3)), adv_s, **kw)
    la.loss.backward()
    lb.loss.backward()
    torch.testing.assert_close(la.loss, lb.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(theta_a.grad, theta_b.grad, rtol=1e-3, atol=1e-7)


def test_the_labeller_names_its_base_and_works_inside_no_grad():
    x = _images(2)
    fn = R.make_labeller("attribution", base="brightness_target", base_kwargs={"layout": "left_bright"}, method="integrated", steps=4)
    with torch.no_grad():  # the loop labels without autograd; the adapter turns it on for its backward
        maps, info = fn(x, ["a", "b"])
    want, _ = R.make_labeller("brightness_target", layout="left_bright")(x, ["a", "b"])
    torch.testing.assert_close(maps.mean((1, 2)), want.mean((1, 2)), rtol=1e-5, atol=1e-6)
    assert info["scalar"] == pytest.approx(want.double().mean((1, 2)).tolist())
    assert not maps.requires_grad and not x.requires_grad


def test_a_reward_without_gradient_says_use_occlusion():
    fn = R.make_labeller("attribution", base="jpeg_size")
    with pytest.raises(PxpoInputError, match="not differentiable.*occlusion"):
        fn(_images(1), ["a"])


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "saliency"}, "reward.kwargs.method.*unknown method"),
    ({"patch": 0}, "reward.kwargs.patch"),
    ({"steps": 0}, "reward.kwargs.steps"),
    ({"base": 3}, "reward.kwargs.base"),
    ({"base": "brightness_target", "base_kwargs": {"layout": "diagonal"}}, "layout"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(PxpoInputError, match=match):
        R.make_labeller("attribution", **kwargs)
