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


def test_scale_is_std_of_residuals_not_of_fixed_pattern():
    """mask_region-like maps: +-1 fixed pattern times brightness 0.5 +- 0.05.

    The position baseline removes the pattern; the scale must be the spread
    that is left, so advantages have unit std (not ~1/9 of it).
    """
    g = torch.Generator().manual_seed(0)
    k = 32
    pattern = torch.ones(8, 8)
    pattern[:, 4:] = -1.0
    brightness = 0.5 + 0.05 * torch.randn(k, 8, 8, generator=g)
    maps = pattern * brightness
    adv = PerPromptStatTracker(64, 1, baseline="position").update(["p"] * k, maps)
    resid = maps.double() - maps.double().mean(0)
    expected = resid / (resid.pow(2).mean().sqrt() + 1e-6)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-4, atol=1e-5)
    assert adv.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    # the raw std is ~10x the residual spread (0.50 vs 0.05)
    assert maps.std(unbiased=False) / resid.pow(2).mean().sqrt() > 9


def test_constant_maps_still_give_ddpo_advantages():  # I1
    r = torch.tensor([0.2, 0.5, 0.9, 0.4])
    maps = r.view(4, 1, 1).expand(4, 3, 3).clone()
    a_map = PerPromptStatTracker(8, 1, baseline="position").update(["p"] * 4, maps)
    a_sc = PerPromptStatTracker(8, 1).update(["p"] * 4, r)
    torch.testing.assert_close(a_map, a_sc.view(4, 1, 1).expand(4, 3, 3))


def test_buffers_are_float32_and_checkpoint_is_packed():
    tr = PerPromptStatTracker(4, 2)
    tr.update(["a", "b"], torch.randn(2, 3, 3, dtype=torch.float64))
    assert all(t.dtype == torch.float32 for b in tr.buffers.values() for t in b)
    st = tr.state_dict()
    assert st["values"].dtype == torch.float32 and st["values"].shape == (2, 3, 3)


def test_memory_bound_evicts_least_recently_updated():
    tr = PerPromptStatTracker(4, 1, max_bytes=3 * 4 * 4)  # room for 3 maps of 2x2
    for p in ["a", "b", "c", "d"]:
        tr.update([p], torch.randn(1, 2, 2))
    assert list(tr.buffers) == ["b", "c", "d"] and tr.evicted == 1
    tr.update(["b"], torch.randn(1, 2, 2))  # b becomes most recent, then c is dropped
    assert list(tr.buffers) == ["d", "b"] and tr.nbytes() <= 3 * 16


def test_checkpoint_of_10000_prompt_run_is_bounded(tmp_path):
    """10,000 prompts with 8x8 maps: float32 packed state, bounded by max_bytes."""
    bound = 1 << 20  # 1 MiB of buffered values
    tr = PerPromptStatTracker(32, 16, max_bytes=bound)
    g = torch.Generator().manual_seed(0)
    for step in range(100):
        prompts = [f"prompt {step * 100 + i}" for i in range(100) for _ in range(2)]
        tr.update(prompts, torch.rand(200, 8, 8, generator=g))
    assert tr.nbytes() <= bound and len(tr.buffers) < 10_000
    path = tmp_path / "tracker.bin"
    torch.save(tr.state_dict(), path)
    assert path.stat().st_size < bound + 200_000  # values + prompt strings
    tr2 = PerPromptStatTracker()
    tr2.load_state_dict(torch.load(path, weights_only=False))
    assert list(tr2.buffers) == list(tr.buffers)
    x = torch.rand(2, 8, 8, generator=g)
    last = list(tr.buffers)[-2:]
    torch.testing.assert_close(tr.update(last, x), tr2.update(last, x))
    # unbounded, the same run keeps all 10,000 prompts in float32 (2 maps each)
    tr3 = PerPromptStatTracker(32, 16)
    for step in range(100):
        prompts = [f"prompt {step * 100 + i}" for i in range(100) for _ in range(2)]
        tr3.update(prompts, torch.rand(200, 8, 8, generator=g))
    path3 = tmp_path / "tracker_unbounded.bin"
    torch.save(tr3.state_dict(), path3)
    assert len(tr3.buffers) == 10_000
    assert path3.stat().st_size < 10_000 * 2 * 64 * 4 * 1.2  # float32 values, no per-tensor overhead
