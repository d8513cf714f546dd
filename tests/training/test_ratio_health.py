"""Importance-ratio health (pxpo.training.guardrails.RatioHealth): thresholds by precision, warn once, stop with the causes."""

import warnings

import pytest
import torch

from pxpo.config import load_config
from pxpo.training.guardrails import RATIO_LIMITS, RatioHealth, TrainingStopped


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


# ----- in the training loop ---------------------------------------------------------------------------------

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1", "train.learning_rate=1e-2", "train.clip_range=0.1"]


def _cfg(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])


def test_the_normal_fp32_config_passes_and_logs_every_epoch(tiny_model_dir, tmp_path):
    import json

    from pxpo.stages.online import run_online

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not even the warning
        run_online(_cfg(tiny_model_dir, tmp_path / "r", "train.epochs=2", "train.inner_epochs=2"), progress=False)
    hist = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [h["ratio_dev_max"] for h in hist] == [pytest.approx(0.0, abs=RATIO_LIMITS["no"][0])] * 2


@pytest.mark.parametrize("train_guidance", [3.5, 7.0])
def test_a_guidance_scale_that_differs_from_sampling_is_caught(tiny_model_dir, tmp_path, train_guidance):
    """Samples drawn at guidance 3 and re-scored at another scale: the first update's ratio is far from 1; the run stops."""
    from pxpo.core.rewards import make_labeller
    from pxpo.prompts import PromptSource
    from pxpo.training.rollout import sample_trajectories
    from pxpo.tracking import JsonlTracker
    from pxpo.training.loop import run
    from pxpo.training.state import build_train_state

    sampled = _cfg(tiny_model_dir, tmp_path / "s", "sample.guidance_scale=3.0")
    pipe, state = build_train_state(sampled)
    traj = sample_trajectories(pipe, sampled, ["a handwritten digit 1"] * 4, [0, 1, 2, 3], policy=state.policy)
    maps, _ = make_labeller("brightness_target")(traj.images, traj.prompts)

    cfg = _cfg(tiny_model_dir, tmp_path / "t", f"sample.guidance_scale={train_guidance}")
    pipe, state = build_train_state(cfg)
    params = [p.detach().clone() for p in state.params]
    with pytest.raises(TrainingStopped, match="importance ratio is off by .* on the first update") as e:
        run(cfg, pipe, state, labeller=make_labeller("brightness_target"), prompts=PromptSource.load("digits"),
            tracker=JsonlTracker(tmp_path / "t"), progress=False, first_batch=(traj, maps, {}), rounds=1)
    assert "guidance scale" in e.value.fix and e.value.exit_code == 3
    assert all(torch.equal(a, b) for a, b in zip(params, state.params))  # stopped before the mismatched step


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_normal_config_passes_under_half_precision_autocast(tiny_model_dir, tmp_path, precision):
    """GPU tier: sampling and training under the same autocast keep the first update's ratio within the precision's limits."""
    import json

    from pxpo.stages.online import run_online

    run_online(_cfg(tiny_model_dir, tmp_path / "r", "train.epochs=2", f"train.mixed_precision={precision}"), progress=False)
    hist = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(h["ratio_dev_max"] < RATIO_LIMITS[precision][1] for h in hist), [h["ratio_dev_max"] for h in hist]
