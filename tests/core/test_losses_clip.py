"""The clip range at any latent size (issue 9 item 4): per-element clip = clip_range * sqrt(d).

Hand-computed values of the rule and of the loss with it, the premise it rests
on (element log-ratios z_i u_i spread sqrt(d) times more than their mean), the
diagnostics both losses log, and the tiny default's effective clip (0.2 per
element, as before the rule: its PXPO runs are unchanged).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from pxpo.core.losses import DIAGNOSTICS, LossOutput, ddpo_loss, element_clip_range, pxpo_loss

ROOT = Path(__file__).resolve().parents[2]


def test_rule_hand_computed():
    assert element_clip_range(1e-4, 4 * 64 * 64) == pytest.approx(0.0128, rel=1e-12)  # SD 1.5: 1e-4 * 128
    assert element_clip_range(0.0125, 4 * 8 * 8) == 0.2  # the embedded default: exactly 0.0125 * 16
    assert element_clip_range(0.1, 1) == 0.1
    with pytest.raises(ValueError, match="n_elements"):
        element_clip_range(0.1, 0)


def test_element_loss_uses_scaled_clip_hand_computed():
    # d = 1*2*2 = 4, clip_range 0.05 -> element clip 0.05 * 2 = 0.1
    r = torch.tensor([1.05, 1.15, 0.85, 0.95]).view(1, 1, 2, 2)
    old = torch.zeros(1, 1, 2, 2)
    out = pxpo_loss(torch.log(r), old, torch.ones(1), mode="ppo", ratio="element", clip_range=0.05)
    # A = 1: max(-r, -clip(r, 0.9, 1.1)) = -1.05, -1.1, -0.85, -0.95
    assert out.loss.item() == pytest.approx(-(1.05 + 1.1 + 0.85 + 0.95) / 4, rel=1e-6)
    assert out.clip_element == pytest.approx(0.1)
    assert out.clipfrac.item() == pytest.approx(0.5)  # 1.15 and 0.85 lie outside 1 +- 0.1
    assert out.clipfrac_element.item() == pytest.approx(0.5)
    # mean log-ratio = mean(log r) = -0.00632 -> ratio 0.9937, inside 1 +- 0.05
    assert out.clipfrac_mean.item() == 0.0
    logs = torch.log(torch.tensor([1.05, 1.15, 0.85, 0.95], dtype=torch.float64))
    assert out.log_ratio_rms_element.item() == pytest.approx(float(logs.square().mean().sqrt()), rel=1e-5)
    assert out.log_ratio_rms_mean.item() == pytest.approx(abs(float(logs.mean())), rel=1e-4)
    # The unscaled clip 0.05 would give max(-r, -clip(r, 0.95, 1.05)) = -1.05, -1.05, -0.85, -0.95 instead.
    assert out.loss.item() != pytest.approx(-(1.05 + 1.05 + 0.85 + 0.95) / 4, rel=1e-4)


def test_mean_ratio_and_ddpo_keep_clip_range():
    # DDPO / ratio="mean" clip the mean ratio at clip_range itself.
    lp = torch.log(torch.tensor([1.5, 0.5, 1.05])).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    old = torch.zeros_like(lp)
    adv = torch.tensor([1.0, 1.0, -2.0])
    d = ddpo_loss(lp, old, adv, mode="ppo", clip_range=0.2)
    m = pxpo_loss(lp, old, adv, mode="ppo", ratio="mean", clip_range=0.2)
    expected = (-1.2 - 0.5 + 2.1) / 3  # as tests/core/test_losses.py: test_ppo_hand_computed_clipping
    assert d.loss.item() == pytest.approx(expected, rel=1e-5)
    assert m.loss.item() == pytest.approx(expected, rel=1e-5)
    for out in (d, m):
        assert out.clipfrac.item() == pytest.approx(2 / 3)
        assert out.clipfrac_mean.item() == pytest.approx(2 / 3)
        assert out.clip_element == pytest.approx(0.4)  # 0.2 * sqrt(4)
        # element ratios equal the sample's ratio here: 1.5 and 0.5 are outside 1 +- 0.4, 1.05 is not
        assert out.clipfrac_element.item() == pytest.approx(2 / 3)


def test_ddpo_per_sample_input_has_no_element_diagnostics():
    out = ddpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.1]), torch.ones(2))
    assert math.isnan(out.clipfrac_element.item()) and math.isnan(out.log_ratio_rms_element.item())
    assert out.clipfrac_mean.item() == pytest.approx(0.5)  # exp(0.1) - 1 > 1e-4; 0 is not
    assert tuple(out.diagnostics()) == DIAGNOSTICS
    assert all(v.ndim == 0 for v in out.diagnostics().values())
    bare = LossOutput(out.loss, out.approx_kl, out.clipfrac, out.ratio_mean)  # a loss that sets only the old fields
    assert math.isnan(bare.diagnostics()["clipfrac_mean"].item())


def test_tiny_default_rule_is_bit_identical_to_the_old_element_clip():
    """clip_range 0.0125 at 4x8x8 gives the old per-element clip 0.2 exactly: same loss and gradient."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(8, 4, 8, 8, generator=g)
    theta = (old + 0.3 * torch.randn(8, 4, 8, 8, generator=g)).requires_grad_(True)
    adv = torch.randn(8, 8, 8, generator=g)
    new = pxpo_loss(theta, old, adv, mode="ppo", ratio="element", clip_range=0.0125)
    new.loss.backward()
    grad_new, theta.grad = theta.grad.clone(), None
    # the loss before the rule, written out: clip 0.2 on element ratios
    a = adv[:, None].expand_as(theta).clamp(-5, 5)
    ratio = torch.exp((theta - old).clamp(-20, 20))
    legacy = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.2)).mean()
    legacy.backward()
    assert torch.equal(new.loss, legacy)
    assert torch.equal(grad_new, theta.grad)
    assert 0.0 < new.clipfrac.item() < 1.0  # the clip is active, so the comparison means something


def test_params_yaml_tiny_default_keeps_element_clip_0_2():
    """The shipped config's effective per-element clip at the embedded default's latent is 0.2 (as before)."""
    from pxpo.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    unet = ROOT / "models" / "base" / "unet" / "config.json"
    c, size = (4, 8)
    if unet.exists():
        u = json.loads(unet.read_text())
        c, size = u["in_channels"], u["sample_size"]
    assert c * size * size == 256
    assert element_clip_range(cfg.train.clip_range, c * size * size) == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("d_shape", [(4, 8, 8), (4, 64, 64)])
def test_rule_clips_elements_as_often_as_the_mean_ratio(d_shape):
    """Premise: log-ratio_i = z_i u_i - u_i^2 / 2 with z ~ N(0, 1) independent of u (a policy whose mean
    moved by u sigma). Element rms / mean rms = sqrt(d), and clip_range * sqrt(d) clips the same fraction
    of elements as clip_range clips of mean ratios; the unscaled clip clips most elements at SD size."""
    g = torch.Generator().manual_seed(3)
    d = math.prod(d_shape)
    b = 4000 if d < 1000 else 300
    u = 0.002 * torch.ones(1, *d_shape)  # constant move: the mean log-ratio is Gaussian; its bias -u^2/2 << its std
    z = torch.randn(b, *d_shape, generator=g, dtype=torch.float64)
    diff = (z * u - u**2 / 2).float()
    mean_std = 0.002 / math.sqrt(d)
    clip = 1.645 * mean_std  # 10 % of a Gaussian lies outside +-1.645 std
    out = pxpo_loss(diff, torch.zeros_like(diff), torch.ones(b), mode="ppo", ratio="element", clip_range=clip)
    assert out.log_ratio_rms_element.item() / out.log_ratio_rms_mean.item() == pytest.approx(math.sqrt(d), rel=0.1)
    assert out.clipfrac_mean.item() == pytest.approx(0.10, abs=0.035)
    assert out.clipfrac_element.item() == pytest.approx(0.10, abs=0.02)
    unscaled = ((torch.exp(diff) - 1).abs() > clip).float().mean().item()
    assert unscaled > (0.5 if d < 1000 else 0.9)
