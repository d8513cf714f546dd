"""Guardrails: skipped non-finite steps, stop + rollback, grad-norm spikes, the drift probe; RLCM's last transition."""

import json

import pytest
import torch

from pxpo.config import load_config
from pxpo.training.guardrails import StepGuard, TrainingStopped
from pxpo.tracking import JsonlTracker

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1", "train.learning_rate=1e-2", "train.clip_range=0.1"]


def _cfg(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])


def test_step_guard_skips_counts_and_stops():
    g = StepGuard(max_skipped=2, spike_factor=10.0, min_history=3)
    assert g.check(1.0, True, "x")
    assert not g.check(float("nan"), True, "x") and not g.check(1.0, False, "x")
    assert g.skipped == 2
    with pytest.raises(TrainingStopped, match="3 optimizer steps had a non-finite"):
        g.check(float("inf"), True, "x")


def test_step_guard_grad_norm_spike():
    g = StepGuard(max_skipped=5, spike_factor=10.0, min_history=3)
    for v in (1.0, 2.0, 1.5, 1.2):
        assert g.check(v, True, "epoch 3")
    assert g.check(13.0, True, "epoch 3")  # 13 < 10 x median 1.35
    with pytest.raises(TrainingStopped, match="running median") as e:
        g.check(1000.0, True, "epoch 3")
    assert e.value.exit_code == 3
    assert StepGuard(spike_factor=0.0, min_history=1).check(1.0, True, "x")  # 0: off


@pytest.fixture(scope="module")
def batch(tiny_model_dir, tmp_path_factory):
    """A built TrainState and 4 sampled trajectories of the tiny model."""
    from pxpo.training.rollout import sample_trajectories
    from pxpo.training.state import build_train_state

    # train.ratio_stop: the tests share the state, so the second trains on trajectories of weights the first changed
    cfg = _cfg(tiny_model_dir, tmp_path_factory.mktemp("g"), "train.max_skipped_steps=10", "train.ratio_stop=1e30")
    pipe, state = build_train_state(cfg)
    traj = sample_trajectories(pipe, cfg, ["a handwritten digit 1"] * 4, [0, 1, 2, 3])
    return cfg, state, traj


def _params(state):
    return [p.detach().clone() for p in state.params]


@pytest.mark.parametrize("inject", ["nan_map", "huge_advantage"])
def test_non_finite_step_is_skipped_and_counted(batch, inject):
    from pxpo.training.loop import train_on_trajectories

    cfg, state, traj = batch
    adv = torch.ones(4, 8, 8)
    if inject == "nan_map":
        adv[1, 0, 0] = float("nan")  # one sample's map (every micro-batch of it poisons its step)
    else:
        adv = adv * 1e38  # finite advantage, non-finite gradient
        cfg = load_config(None, [f"model.path={cfg.model.path}", f"output_dir={cfg.output_dir}", *FAST, "train.adv_clip_max=3e38", "train.max_skipped_steps=10", "train.ratio_stop=1e30"])
    before = _params(state)
    logs = train_on_trajectories(state, traj, adv, cfg, epoch=0)
    after = _params(state)
    assert all(torch.isfinite(p).all() for p in after)
    assert logs["skipped_steps"] >= 1 and logs["optimizer_steps"] + logs["skipped_steps"] == 2
    if logs["optimizer_steps"] == 0:
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_run_stops_and_rolls_back_to_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import pxpo.training.loop
    from pxpo.stages.online import run_online as run

    real = pxpo.training.loop.compute_advantages
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        adv = real(*a, **k)
        return adv * float("nan") if calls["n"] == 3 else adv

    monkeypatch.setattr(pxpo.training.loop, "compute_advantages", poisoned)
    out = tmp_path / "r"
    cfg = _cfg(tiny_model_dir, out, "train.epochs=4", "train.max_skipped_steps=1", "train.keep_checkpoints=5")
    with pytest.raises(TrainingStopped) as e:
        run(cfg, JsonlTracker(out), progress=False)
    msg = str(e.value)
    assert "non-finite" in msg and "rolled back to checkpoint" in msg and "epoch_0001" in msg
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0000", "epoch_0001"]
    # nothing lost: the resumed run continues from epoch 2 and finishes
    monkeypatch.setattr(pxpo.training.loop, "compute_advantages", real)
    summary = run(cfg, JsonlTracker(out), progress=False)
    assert summary["completed_epochs"] == 4
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_cli_exit_code_of_a_stopped_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import pxpo.training.loop
    from pxpo.cli import main

    real = pxpo.training.loop.compute_advantages
    monkeypatch.setattr(pxpo.training.loop, "compute_advantages", lambda *a, **k: real(*a, **k) * float("nan"))
    rc = main(["run", f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'r'}", *FAST, "train.epochs=1", "train.max_skipped_steps=0"])
    assert rc == 3
    assert "no checkpoint yet" in capsys.readouterr().err


def test_drift_probe_is_logged(tmp_path, tiny_model_dir):
    from pxpo.stages.online import run_online as run

    out = tmp_path / "p"
    cfg = _cfg(tiny_model_dir, out, "train.epochs=2", "train.probe_every=1", "train.probe_samples=2")
    run(cfg, JsonlTracker(out), progress=False)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("probe_drift_pixel_l1" in h and "probe_drift_latent_rms" in h for h in hist)
    assert hist[-1]["probe_drift_latent_rms"] > 0  # the policy moved away from the base
    assert (out / "probe_base.safetensors").is_file()
    # and, at each probed epoch, the base-vs-policy grid of the probe batch and the epoch's mean reward map
    from pxpo.tracking import image_steps

    assert {k: [s for s, _ in v] for k, v in image_steps(out).items()} == {"probe_samples": [0, 1], "reward_map_mean": [0, 1]}


def test_lcm_loss_leaves_out_the_last_renoising(tmp_path, tiny_lcm_model_dir, monkeypatch):
    """The last transition only adds noise after the rewarded f_theta output: never scored in training."""
    import pxpo.core.lcm
    from pxpo.stages.online import run_online as run

    seen = []
    real = pxpo.core.lcm.lcm_step_with_logprob

    def spy(sched, pred, t, tp, *a, **k):
        if k.get("prev_sample") is not None:  # re-scoring a stored transition: training
            seen.append(torch.as_tensor(tp).clone())
        return real(sched, pred, t, tp, *a, **k)

    monkeypatch.setattr(pxpo.core.lcm, "lcm_step_with_logprob", spy)
    out = tmp_path / "l"
    cfg = _cfg(tiny_lcm_model_dir, out, "train.epochs=1", "sample.sampler=lcm", "sample.num_steps=4", "train.probe_every=0")
    run(cfg, JsonlTracker(out), progress=False)
    prev = torch.cat([s.flatten() for s in seen])
    assert (prev >= 0).all() and len(seen) == 2 * 3  # 2 micro-batches x 3 trained transitions
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["optimizer_steps"] == 2


def test_one_step_lcm_is_refused():
    from pxpo.core.lcm import trained_transitions
    from pxpo.errors import PxpoInputError

    assert trained_transitions("ddim", 20) == 20 and trained_transitions("lcm", 4) == 3
    with pytest.raises(PxpoInputError, match="sample.num_steps"):
        trained_transitions("lcm", 1)
