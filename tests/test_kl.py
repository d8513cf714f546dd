"""The per-element Gaussian KL to the reference (pxpo.core.kl): hand-computed values, the general form, I7."""

import math

import pytest
import torch

from pxpo.core.kl import gaussian_kl, step_kl, weighted_kl_mean


def test_equal_std_closed_form_by_hand():
    # (mu_p - mu_ref)^2 / (2 s^2): (1 - 0)^2 / (2 * 0.25) = 2; (0.5 - 1.5)^2 / (2 * 0.25) = 2; (3 - 3)^2 ... = 0
    mp, mr = torch.tensor([1.0, 0.5, 3.0]), torch.tensor([0.0, 1.5, 3.0])
    torch.testing.assert_close(gaussian_kl(mp, mr, 0.5), torch.tensor([2.0, 2.0, 0.0]))
    # per-sample std broadcast over elements: s = 0.1 -> 0.3^2 / 0.02 = 4.5
    kl = gaussian_kl(torch.full((2, 1, 2, 2), 0.3), torch.zeros(2, 1, 2, 2), torch.tensor([0.1, 1.0]).view(2, 1, 1, 1))
    torch.testing.assert_close(kl[:, 0, 0, 0], torch.tensor([4.5, 0.045]))


def test_unequal_std_by_hand_and_against_torch():
    # s_p = 1, s_r = 2, equal means: log 2 + 1/8 - 1/2 = 0.318147...
    assert gaussian_kl(torch.tensor([0.0]), torch.tensor([0.0]), 1.0, 2.0).item() == pytest.approx(math.log(2) + 0.125 - 0.5)
    # s_p = 2, s_r = 1, means 1 apart: log(1/2) + (4 + 1) / 2 - 1/2 = 2 - log 2
    assert gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]), 2.0, 1.0).item() == pytest.approx(2 - math.log(2))
    g = torch.Generator().manual_seed(0)
    mp, mr = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sp, sr = torch.rand(3, 4, generator=g) + 0.1, torch.rand(3, 4, generator=g) + 0.1
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mp, sp), torch.distributions.Normal(mr, sr))
    torch.testing.assert_close(gaussian_kl(mp, mr, sp, sr), want)
    # the general form reduces to the closed form when the stds are equal
    torch.testing.assert_close(gaussian_kl(mp, mr, sp, sp), gaussian_kl(mp, mr, sp), atol=1e-6, rtol=1e-5)


def test_kl_of_a_policy_to_itself_is_zero_and_grad_flows_through_the_policy_mean():
    class Step:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

    mean = torch.randn(2, 4, 3, 3, requires_grad=True)
    std = torch.full((2, 1, 1, 1), 0.2)
    assert step_kl(Step(mean, std), Step(mean.detach(), std)).abs().max() == 0
    ref = Step(torch.zeros(2, 4, 3, 3), std)
    kl = step_kl(Step(mean, std), ref)
    kl.mean().backward()
    torch.testing.assert_close(mean.grad, mean.detach() / (0.04 * kl.numel()))  # d/dmu of mu^2 / (2 s^2), mean over elements
    assert step_kl(Step(mean, std), Step(mean.detach(), std * 2)).min() > 0  # unequal stds: the general form


def test_weighted_mean_weights_pixels():
    kl = torch.tensor([[[[1.0, 3.0]]]])
    assert weighted_kl_mean(kl).item() == 2.0
    assert weighted_kl_mean(kl, torch.tensor([[[[1.0, 0.0]]]])).item() == 1.0
    assert weighted_kl_mean(kl, torch.tensor([[[[1.0, 3.0]]]])).item() == pytest.approx(2.5)
