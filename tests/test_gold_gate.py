"""Gold rewards that guard promotion: digit_fidelity, evaluation of base and policy, register.max_gold_drop."""

import json

import numpy as np
import pytest
import torch

import prereq
from pxpo.config import load_config
from pxpo.errors import PxpoInputError
from pxpo.labellers import make_gold, prompted_digit
from pxpo.mlflow.promotion import gold_gate


def _digits(n=40):
    from pxpo.embedded.digits import digits_dataset

    images, labels = digits_dataset(16)
    return (images[:n] + 1) / 2, labels[:n]


def test_digit_fidelity_scores_the_prompted_digit():
    """High for real digits under their own prompt, low under another digit's prompt and for a blank white image."""
    fn = make_gold(load_config(None, ["evaluate.gold=[{name: digit_fidelity}]"]).evaluate)["digit_fidelity"]
    images, labels = _digits()
    right, info = fn(images, [f"a handwritten digit {d}" for d in labels.tolist()])
    wrong, _ = fn(images, [f"a handwritten digit {(d + 1) % 10}" for d in labels.tolist()])
    blank, _ = fn(torch.ones(10, 3, 16, 16), [f"a handwritten digit {d}" for d in range(10)])
    assert right.shape == (40, 16, 16) and (right == right[:, :1, :1]).all()  # a constant map per image
    assert right.mean() > 0.8 and np.mean(info["correct"]) > 0.9
    assert wrong.mean() < 0.1 and blank.mean() < 0.3
    acc, _ = make_gold(load_config(None, ["evaluate.gold=[{name: digit_fidelity, kwargs: {score: correct}}]"]).evaluate)["digit_fidelity"](
        images, [f"a handwritten digit {d}" for d in labels.tolist()])
    assert set(acc.unique().tolist()) <= {0.0, 1.0} and acc.mean().item() == pytest.approx(np.mean(info["correct"]))


def test_prompted_digit_and_a_prompt_without_one():
    assert prompted_digit("a handwritten digit 7") == 7 and prompted_digit("7 of them") == 7
    with pytest.raises(PxpoInputError, match="digit_fidelity: prompt 'a red car'.*names no digit"):
        prompted_digit("a red car")


def test_gold_gate_says_which_gold_fell_and_by_how_much():
    m = {"gold": {"digit_fidelity": {"base": 0.93, "policy": 0.41}, "sharpness": {"base": 0.5, "policy": 0.52}}}
    ok, text = gold_gate(m, 0.05)
    assert not ok
    assert text.startswith("gold digit_fidelity 0.9300 (base) -> 0.4100 (policy), drop +0.5200 > register.max_gold_drop 0.05")
    assert "gold sharpness 0.5000 (base) -> 0.5200 (policy), drop -0.0200" in text
    assert gold_gate(m, 0.6)[0] and gold_gate(m, None)[0]  # within the bound; gate off
    assert gold_gate({}, None) == (True, "")
    with pytest.raises(PxpoInputError, match="no gold rewards, which register.max_gold_drop needs"):
        gold_gate({"reward_mean": 1.0}, 0.05)


@pytest.mark.parametrize("override, match", [
    (["reward.name=brightness_target", "reward.kwargs={layout: left_bright}",  # the trained reward named, not the default's
      "evaluate.gold=[{name: brightness_target, kwargs: {layout: left_bright}}]"], "also the trained reward"),
    (["register.max_gold_drop=0.1"], "evaluate.gold names no gold reward"),
    (["evaluate.gold=[{name: constant}, {name: nope}]"], r"evaluate\.gold\.1\.name: unknown labeller"),
])
def test_bad_gold_configs(override, match):
    with pytest.raises(PxpoInputError, match=match):
        load_config(None, override)


def test_the_shipped_params_gate_on_prompt_fidelity():
    """The quickstart's default: prompt fidelity as gold, the gate on, and a KL to the base model."""
    cfg = load_config("params.yaml")
    assert [g.name for g in cfg.evaluate.gold] == ["digit_fidelity"] and cfg.register.max_gold_drop is not None
    assert cfg.train.kl_coef > 0


def test_evaluation_grid_rows_are_labelled(tmp_path):
    from PIL import Image

    from pxpo.plots import save_grid, save_labelled_grid

    imgs = torch.zeros(5, 3, 4, 4)
    save_grid(imgs, tmp_path / "plain.png", nrow=4, scale=4)
    save_labelled_grid({"base": imgs, "policy": imgs}, tmp_path / "grid.png", nrow=4, scale=4)
    plain, grid = Image.open(tmp_path / "plain.png"), np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    rows = grid.shape[0] // (5 * 4)
    assert rows == 4 and grid.shape[1] > plain.width  # each block padded to 2 whole rows; a label margin
    margin = grid[:, : grid.shape[1] - plain.width]
    ink = [(margin[r * 20 : (r + 1) * 20] < 128).any() for r in range(4)]
    assert ink == [True, False, True, False]  # "base" on row 0, "policy" on row 2 (the first row of each block)


# ----- end to end: a hackable reward, the gold falls, the gate refuses --------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    mlflow = prereq.import_module("mlflow", "pinned in requirements-lock.txt (bash scripts/setup.sh)")
    from pxpo.mlflow.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(tmp_path / "store")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_training_on_a_hackable_reward_is_refused_by_the_gold_gate(store, tmp_path, tiny_vae_model_dir):
    """Train on "all bright" (any digit can be painted over); the gold reward "darkness" (1 - luminance,
    which training never sees) falls. With register.max_gold_drop the policy is not promoted and the decision
    says which gold fell and by how much; with the gate off the same policy is promoted."""
    import mlflow

    from pxpo.evaluate import summarize
    from pxpo.stages.evaluate import evaluate
    from pxpo.stages.online import run_online
    from pxpo.stages.register import register

    common = [
        f"model.path={tiny_vae_model_dir}", "sample.num_steps=3",
        # two components (the constant one leaves the advantages as they are) to follow per-component metrics
        "reward.components=[{name: brightness_target, kwargs: {layout: all_bright}, label: bright}, {name: constant, weight: 0.5, label: bias}]",
        "evaluate.gold=[{name: brightness_target, kwargs: {layout: all_dark}, label: darkness}]", "evaluate.samples_per_prompt=4",
    ]
    train = load_config(None, [*common, f"output_dir={tmp_path / 'policy'}", "train.epochs=8", "train.learning_rate=3e-2",
                               "sample.batch_size=16", "train.batch_size=8", "train.save_every=100", "train.clip_range=0.1",
                               "train.kl_coef=0.001"])  # a KL too weak to stop the hack, logged as train.kl_ref
    summary = run_online(train, progress=False)
    assert summary["reward_last"] > summary["reward_first"]  # the trained reward rose

    metrics = evaluate(load_config(None, common), tmp_path / "eval", policy=tmp_path / "policy")
    g = metrics["gold"]["darkness"]
    assert metrics["gold_darkness"] == g["policy"] and metrics["base_gold_darkness"] == g["base"]
    assert metrics["reward_gain"] > 0.02 and g["base"] - g["policy"] > 0.02  # reward up, gold down
    assert f"gold darkness {g['base']:.4f} -> {g['policy']:.4f}" in summarize(metrics)

    def decide(name, gate):
        cfg = load_config(None, [*common, f"register.model_name={name}", *gate])
        return register(cfg, tmp_path / "policy", tmp_path / "eval", tracking_uri=store)

    refused = decide("pxpo-gold-on", ["register.max_gold_drop=0.02"])
    drop = g["base"] - g["policy"]
    assert not refused["promoted"] and not refused["gold_passed"]
    assert f"gold darkness {g['base']:.4f} (base) -> {g['policy']:.4f} (policy), drop {drop:+.4f} > register.max_gold_drop 0.02" in refused["reason"]
    promoted = decide("pxpo-gold-off", [])
    assert promoted["promoted"] and promoted["gold_passed"] and "gold darkness" in promoted["reason"]

    run = mlflow.MlflowClient(store).get_run(refused["run_id"])
    assert run.data.metrics["gold_darkness"] == pytest.approx(g["policy"]) and run.data.metrics["base_gold_darkness"] == pytest.approx(g["base"])
    assert "drop" in run.data.tags["pxpo.gold"]
    for key in ("train.ratio_dev_max", "train.reward_bright", "train.reward_bias", "train.kl_ref", "reward_bright", "base_reward_bright"):
        assert key in run.data.metrics, key  # ratio health, per-component rewards (training and evaluation), KL
    assert metrics["reward_bias"] == 1.0 and metrics["reward_bright"] > metrics["base_reward_bright"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["gold"]["darkness"] == g
