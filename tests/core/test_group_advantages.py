"""GRPO group-relative advantages: Flow-GRPO's scalar formula, per-position maps, I5."""

import numpy as np
import pytest
import torch

from pxpo.core.advantages import GroupRelative, PerPromptStatTracker, group_advantages

PROMPTS = ["a", "b", "a", "a", "b", "c"]
R = torch.tensor([1.0, 5.0, 2.0, 6.0, 3.0, 4.0])


def test_scalar_group_advantages_are_flow_grpos():
    """(r - group mean) / (group std + 1e-4), population std, as flow_grpo's PerPromptStatTracker."""
    adv = group_advantages(PROMPTS, R, std="group")
    a = np.array([1.0, 2.0, 6.0])
    b = np.array([5.0, 3.0])
    expected = np.empty(6)
    expected[[0, 2, 3]] = (a - a.mean()) / (a.std() + 1e-4)
    expected[[1, 4]] = (b - b.mean()) / (b.std() + 1e-4)
    expected[5] = 0.0  # a group of one: no signal
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_global_std_is_the_std_of_all_rewards():
    adv = group_advantages(PROMPTS, R, std="global")
    r = R.double().numpy()
    s = r.std()
    np.testing.assert_allclose(adv[[0, 2, 3]].numpy(), (r[[0, 2, 3]] - r[[0, 2, 3]].mean()) / (s + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(adv[[1, 4]].numpy(), (r[[1, 4]] - 4.0) / (s + 1e-4), rtol=1e-6)


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("baseline", ["position", "scalar"])
def test_constant_maps_give_exactly_the_scalar_advantages(std, baseline):  # (I5)
    maps = R.view(6, 1, 1).expand(6, 4, 4).clone()
    a_map = group_advantages(PROMPTS, maps, std=std, baseline=baseline)
    a_sc = group_advantages(PROMPTS, R, std=std, baseline=baseline)
    assert torch.equal(a_map, a_sc.view(6, 1, 1).expand(6, 4, 4))


def test_per_position_mean_and_residual_spread():
    g = torch.Generator().manual_seed(0)
    pattern = torch.ones(4, 4)
    pattern[:, 2:] = -1.0  # a fixed pattern no sample changes
    maps = pattern * (0.5 + 0.05 * torch.randn(8, 4, 4, generator=g))
    prompts = ["p"] * 4 + ["q"] * 4
    adv = group_advantages(prompts, maps)
    for grp in (slice(0, 4), slice(4, 8)):
        m = maps[grp].double()
        resid = m - m.mean(0)
        torch.testing.assert_close(adv[grp].double(), resid / (resid.pow(2).mean().sqrt() + 1e-4), rtol=1e-5, atol=1e-6)
        assert adv[grp].mean(0).abs().max() < 1e-5  # per-position baseline: zero mean at every position


def test_group_estimator_has_the_tracker_interface_and_no_memory():
    est = GroupRelative(baseline="position", std="group")
    a1 = est.update(PROMPTS, R)
    est.update(PROMPTS, R * 10)  # a previous epoch does not change the next one
    assert torch.equal(est.update(PROMPTS, R), a1)
    assert est.stats()["mean_group_size"] == 2.0
    est2 = GroupRelative()
    est2.load_state_dict(est.state_dict())
    assert (est2.baseline, est2.std) == ("position", "group")
    # unlike the per-prompt tracker, which keeps buffers across epochs
    tr = PerPromptStatTracker(8, 1)
    tr.update(PROMPTS, R * 10)
    assert not torch.equal(tr.update(PROMPTS, R), a1)
