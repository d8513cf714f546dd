"""Typed config: params.yaml + overrides, validation messages name the field and fix."""

import pytest

from pxpo.config import Config, dump_config, load_config
from pxpo.errors import PxpoInputError


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.sample.eta > 0 and cfg.train.algorithm == "pxpo"


def test_params_yaml_and_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: 3\n  learning_rate: 1.0e-3\nsample:\n  num_steps: 10\nbase:\n  vae_steps: 1\n")
    cfg = load_config(p, ["train.epochs=5", "reward.kwargs={layout: top_bright}", "model.path=/x"])
    assert cfg.train.epochs == 5 and cfg.train.learning_rate == 1e-3 and cfg.sample.num_steps == 10
    assert cfg.reward.kwargs == {"layout": "top_bright"}
    assert cfg.model.path == "/x"


def test_roundtrip_dump(tmp_path):
    cfg = load_config(None, ["train.epochs=7"])
    p = tmp_path / "p.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize(
    "override,field",
    [
        ("sample.eta=0", "sample.eta"),
        ("train.batch_size=5", "train.batch_size"),
        ("train.gradient_accumulation_steps=3", "train.gradient_accumulation_steps"),
        ("train.algorithm=ppo2", "train.algorithm"),
        ("train.epochs=abc", "train.epochs"),
        ("train.nonsense=1", "train.nonsense"),
        ("train.min_count=64", "train.min_count"),
        ("train.use_lora=maybe", "train.use_lora"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(PxpoInputError) as e:
        load_config(None, [override])
    assert field in str(e.value) and "Fix:" in str(e.value)


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(PxpoInputError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(PxpoInputError, match="bad.yaml"):
        load_config(bad)
