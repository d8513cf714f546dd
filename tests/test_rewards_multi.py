"""Several rewards at once: the weighted combination, group normalisation, the config form, failures that name themselves."""

import pytest
import torch

from pxpo.config import load_config
from pxpo.core.rewards import Component, combine_maps, combined_labeller, component_means, group_normalize, make_labeller
from pxpo.errors import PxpoInputError
from pxpo.labellers import make_reward


def _images(b=4, seed=0):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_single_labeller_form_is_unchanged():
    """The old params (reward.name / kwargs) give exactly the labeller they always gave."""
    cfg = load_config(None, ["reward.name=brightness_target", "reward.kwargs={layout: top_bright}"])
    assert cfg.reward.labellers()[0].name == "brightness_target" and cfg.reward.describe() == "brightness_target"
    x, prompts = _images(), ["a"] * 4
    got, info = make_reward(cfg.reward)(x, prompts)
    want, _ = make_labeller("brightness_target", layout="top_bright")(x, prompts)
    assert torch.equal(got, want) and not component_means(info)
    assert load_config("params.yaml").reward.labellers()  # the shipped params load


def test_components_are_weighted_and_logged():
    cfg = load_config(None, ["reward.components=[{name: brightness_target, kwargs: {layout: all_bright}, weight: 0.5},"
                             " {name: constant, kwargs: {value: 2.0}, weight: -1.0, label: bias}]"])
    assert cfg.reward.describe() == "0.5*brightness_target + -1*bias"
    x, prompts = _images(), list("abcd")
    maps, info = make_reward(cfg.reward)(x, prompts)
    bright, _ = make_labeller("brightness_target", layout="all_bright")(x, prompts)
    torch.testing.assert_close(maps, 0.5 * bright - 2.0)
    means = component_means(info)
    assert set(means) == {"reward_brightness_target", "reward_bias"} and means["reward_bias"] == pytest.approx(2.0)
    assert means["reward_brightness_target"] == pytest.approx(float(bright.mean()))


def test_a_scalar_component_is_a_constant_map():
    def scalar(images, prompts):
        return torch.arange(images.shape[0], dtype=torch.float32), {}

    fn = combined_labeller([Component("idx", scalar, 2.0)])
    maps, info = fn(_images(3), ["p"] * 3)
    assert maps.shape == (3, 8, 8) and torch.equal(maps[:, 0, 0], torch.tensor([0.0, 2.0, 4.0])) and (maps == maps[:, :1, :1]).all()
    assert info["reward_idx"] == [0.0, 1.0, 2.0]


def test_group_normalisation_makes_weights_compare_like_with_like():
    """Without it a reward in large units drowns the other; with it equal weights are an equal say.

    Two samples of one prompt: `size` (units ~1000) prefers sample 0, `quality` (units ~0.01) prefers
    sample 1 by the same relative margin. Raw, the sum ranks sample 0 first; group-normalised, a tie.
    """
    prompts = ["p", "p"]
    size = torch.tensor([1100.0, 1000.0])[:, None, None].expand(2, 4, 4)
    quality = torch.tensor([0.10, 0.11])[:, None, None].expand(2, 4, 4)
    maps, w = {"size": size, "quality": quality}, {"size": 1.0, "quality": 1.0}
    raw = combine_maps(maps, w, prompts, "none")
    assert raw[0].mean() > raw[1].mean() + 50
    norm = combine_maps(maps, w, prompts, "group")
    torch.testing.assert_close(norm[0], norm[1], atol=1e-3, rtol=0)  # up to the 1e-6 in the std
    # and raising a weight now moves the ranking, which it could not do raw
    assert combine_maps(maps, {"size": 1.0, "quality": 2.0}, prompts, "group")[1].mean() > 0


def test_group_normalize_per_prompt_and_position():
    """Constant maps: GRPO's scalar group advantage; groups are independent; a group of one gives 0."""
    r = torch.tensor([1.0, 3.0, 10.0, 20.0, 7.0])
    prompts = ["a", "a", "b", "b", "c"]
    z = group_normalize(r[:, None, None].expand(5, 2, 2), prompts)
    torch.testing.assert_close(z[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    # a fixed spatial pattern shared by the group is removed per position (not counted in the scale)
    pattern = torch.tensor([[0.0, 100.0], [0.0, 100.0]])
    z2 = group_normalize(r[:, None, None] + pattern, prompts)
    torch.testing.assert_close(z2, z, atol=1e-5, rtol=0)


def test_the_config_selects_group_normalisation():
    over = ["reward.components=[{name: brightness_target, kwargs: {layout: all_bright}}, {name: jpeg_size}]"]
    x, prompts = _images(4), ["a", "a", "b", "b"]
    raw, _ = make_reward(load_config(None, over).reward)(x, prompts)
    norm, _ = make_reward(load_config(None, [*over, "reward.normalize=group"]).reward)(x, prompts)
    assert raw.mean() > 0.3  # kB + luminance
    torch.testing.assert_close(norm.mean((1, 2)).reshape(2, 2).sum(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_a_failing_component_names_itself():
    def broken(images, prompts):
        raise RuntimeError("model server down")

    good = make_labeller("constant", value=1.0)
    with pytest.raises(RuntimeError, match="model server down") as e:
        combined_labeller([Component("ok", good), Component("aesthetic", broken)])(_images(2), ["a", "b"])
    assert "raised by reward component 'aesthetic'" in "".join(e.value.__notes__)

    cfg = load_config(None, ["reward.components=[{name: constant}, {name: digit_fidelity}]"])
    with pytest.raises(PxpoInputError, match="reward component 'digit_fidelity'.*names no digit"):
        make_reward(cfg.reward)(_images(2), ["a cat", "a dog"])

    def bad_shape(images, prompts):
        return torch.zeros(images.shape[0], 3, 3), {}

    with pytest.raises(PxpoInputError, match="reward component 'small'"):
        combined_labeller([Component("small", bad_shape)])(_images(2), ["a", "b"])


@pytest.mark.parametrize("override, match", [
    (["reward.name=constant", "reward.components=[{name: constant}]"], "both reward.name"),
    (["reward.components=[{name: constant}, {name: constant, kwargs: {value: 2}}]"], "same key"),
    (["reward.components=[{name: constant, label: mean}]"], "cannot be a metric key"),
    (["reward.components=[{name: nope}]"], r"reward\.components\.0\.name: unknown labeller 'nope'"),
    (["reward.components=[{name: constant, weight: 0}]"], "every weight is 0"),
    (["reward.normalize=zscore"], "unknown value"),
])
def test_bad_reward_configs_say_what_to_fix(override, match):
    with pytest.raises(PxpoInputError, match=match):
        load_config(None, override)


def test_components_round_trip_through_params(tmp_path):
    from pxpo.config import dump_config

    cfg = load_config(None, ["reward.components=[{name: constant, weight: 2}, {name: jpeg_size, label: kb}]", "reward.normalize=group"])
    p = tmp_path / "params.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again.reward == cfg.reward and again.reward.describe() == "2*constant + 1*kb (group-normalised)"


def test_contrast_rewards_black_and_white_pixels():
    """contrast: |2 lum - 1|^(2 gamma): 1 at pure black or white, 0 at mid-grey; gamma sharpens it."""
    x = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    maps, _ = make_labeller("contrast")(x, ["a"])
    torch.testing.assert_close(maps, torch.tensor([[[1.0, 0.0], [1.0, 0.25]]]))
    torch.testing.assert_close(make_labeller("contrast", gamma=2.0)(x, ["a"])[0][0, 1, 1], torch.tensor(0.0625))
    with pytest.raises(PxpoInputError, match="gamma"):
        make_labeller("contrast", gamma=0)


def test_the_label_stage_and_the_loop_log_each_component(tiny_model_dir, tmp_path):
    """`pxpo label` stores each component's per-sample means with the maps; `pxpo run` logs reward_<key> per epoch."""
    import json

    from pxpo.stages.label import label
    from pxpo.stages.online import run_online
    from pxpo.stages.sample import sample
    from pxpo.trajectories import load_reward_maps

    over = [f"model.path={tiny_model_dir}", "sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2",
            "reward.components=[{name: brightness_target, label: left}, {name: contrast, weight: 0.5}]"]
    cfg = load_config(None, [*over, f"output_dir={tmp_path / 'run'}", "train.epochs=2"])
    sample(cfg, tmp_path / "traj")
    s = label(cfg, tmp_path / "traj")
    assert s["labeller"] == "1*left + 0.5*contrast"
    maps, info = load_reward_maps(tmp_path / "traj", 4, (16, 16))
    assert len(info["reward_left"]) == len(info["reward_contrast"]) == 4
    torch.testing.assert_close(maps.mean((1, 2)), torch.tensor(info["reward_left"]) + 0.5 * torch.tensor(info["reward_contrast"]))
    run_online(cfg, progress=False)
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward_left", "reward_contrast"} <= set(h) for h in hist)
    assert hist[0]["reward_mean"] == pytest.approx(hist[0]["reward_left"] + 0.5 * hist[0]["reward_contrast"], rel=1e-5)
