"""Per-prompt stat tracking for scalars and maps."""

import numpy as np
import pytest
import torch

from pxpo.core.advantages import PerPromptStatTracker, to_latent_grid


def test_batch_stats_until_min_count_then_buffer():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    r1 = torch.tensor([1.0, 2.0, 10.0])
    a1 = tr.update(["a", "a", "b"], r1)
    expected = (r1.numpy() - r1.numpy().mean()) / (r1.numpy().std() + 1e-6)
    np.testing.assert_allclose(a1.numpy(), expected, rtol=1e-5)
    a2 = tr.update(["a", "b"], torch.tensor([3.0, 20.0]))
    # "a" now has 3 buffered values [1, 2, 3] -> its own stats; "b" has 2 -> batch stats of [3, 20]
    assert a2[0].item() == pytest.approx((3 - 2) / (np.std([1, 2, 3]) + 1e-6), rel=1e-5)
    assert a2[1].item() == pytest.approx((20 - 11.5) / (np.std([3, 20]) + 1e-6), rel=1e-5)


def test_buffer_is_fifo():
    tr = PerPromptStatTracker(buffer_size=2, min_count=1)
    for v in [1.0, 2.0, 3.0]:
        tr.update(["a"], torch.tensor([v]))
    assert [float(x) for x in tr.buffers["a"]] == [2.0, 3.0]


def test_position_baseline_removes_fixed_pattern():
    """A map that no sample can change (fixed bright-left) gives zero advantage per position."""
    fixed = torch.zeros(4, 2, 2)
    fixed[:, :, 0] = 1.0
    noise = torch.tensor([0.1, -0.1, 0.2, -0.2]).view(4, 1, 1)
    maps = fixed + noise
    adv = PerPromptStatTracker(8, 8, baseline="position").update(["p"] * 4, maps)
    # per-position mean removes the left/right pattern: advantage only from the noise
    assert torch.allclose(adv[:, :, 0], adv[:, :, 1], atol=1e-5)
    adv_s = PerPromptStatTracker(8, 8, baseline="scalar").update(["p"] * 4, maps)
    assert (adv_s[:, :, 0] > adv_s[:, :, 1]).all()


def test_state_dict_roundtrip():
    tr = PerPromptStatTracker(4, 2)
    tr.update(["a", "b"], torch.randn(2, 3, 3))
    tr2 = PerPromptStatTracker()
    tr2.load_state_dict(tr.state_dict())
    x = torch.randn(2, 3, 3)
    torch.testing.assert_close(tr.update(["a", "b"], x), tr2.update(["a", "b"], x))


def test_to_latent_grid_area_average():
    m = torch.arange(16.0).view(1, 4, 4)
    out = to_latent_grid(m, (2, 2))
    assert out.shape == (1, 2, 2)
    assert out[0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert to_latent_grid(m, (4, 4)) is not None and torch.equal(to_latent_grid(m, (4, 4)), m)
