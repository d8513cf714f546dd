"""Importance-ratio health (pxpo.guardrails.RatioHealth): thresholds by precision, warn once, stop with the causes."""

import warnings

import pytest
import torch

from pxpo.config import load_config
from pxpo.guardrails import RATIO_LIMITS, RatioHealth, TrainingStopped


def test_limits_follow_precision_and_config():
    t = load_config(None, []).train
    assert (RatioHealth.from_config(t, "no").warn, RatioHealth.from_config(t, "no").stop) == RATIO_LIMITS["no"]
    assert RatioHealth.from_config(t, "bf16").stop > RatioHealth.from_config(t, "fp16").stop > RatioHealth.from_config(t, "no").stop
    t2 = load_config(None, ["train.ratio_warn=0.3", "train.ratio_stop=2"]).train
    h = RatioHealth.from_config(t2, "fp16")
    assert (h.warn, h.stop) == (0.3, 2.0)


def test_only_the_first_update_counts():
    h = RatioHealth(warn=0.01, stop=1.0)
    lp = torch.zeros(2, 3)
    h.start_epoch()
    h.observe(lp + 1e-4, lp)
    h.observe(lp, lp + torch.tensor([[0.0, 0.0, 2e-3], [0, 0, 0]]))  # worst element: |exp(-2e-3) - 1|
    assert h.first_update("epoch 0") == pytest.approx(2e-3, rel=1e-2)
    h.observe(lp + 5.0, lp)  # after the first step the weights moved: not counted
    assert h.metrics() == {"ratio_dev_max": pytest.approx(2e-3, rel=1e-2)}
    h.start_epoch()
    assert h.first_update("epoch 1") == 0.0


def test_warns_once_and_stops_naming_the_causes():
    h = RatioHealth(warn=0.01, stop=0.5, precision="fp16")
    lp = torch.zeros(4)
    for _ in range(2):
        h.start_epoch()
        h.observe(lp + 0.05, lp)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            h.first_update("training epoch 3")
        assert len(w) == (1 if _ == 0 else 0)
    h.start_epoch()
    h.observe(torch.tensor([0.0, 0.0, 0.9, 0.0]), lp)  # exp(0.9) - 1 = 1.46 > 0.5
    with pytest.raises(TrainingStopped, match="off by 1.46.*precision 'fp16'") as e:
        h.first_update("training epoch 4")
    for cause in ("precision", "guidance scale", "scheduler config", "dropout"):
        assert cause in e.value.fix
    assert e.value.exit_code == 3
    h.start_epoch()
    h.observe(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(TrainingStopped):
        h.first_update("x")


def test_the_decision_uses_the_max_over_processes():
    h = RatioHealth(warn=0.01, stop=0.5)
    h.start_epoch()
    h.observe(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TrainingStopped):
        h.first_update("epoch 0", reduce=lambda worst: max(worst, 3.0))  # another process saw 3.0
