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


# --- pydantic models: unknown keys, types, overrides, round trip ---------------------------------


def _params(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_params_yaml_in_the_repo_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml")
    assert cfg.base.vae_steps > 0 and cfg.train.clip_range > 0


def test_unknown_top_level_key_names_file_and_closest_key(tmp_path):
    p = _params(tmp_path, "trian:\n  epochs: 3\n")
    with pytest.raises(PxpoInputError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "trian" in msg and "did you mean 'train'" in msg and "sample" in msg


def test_unknown_nested_key_names_file_field_and_closest_key(tmp_path):
    p = _params(tmp_path, "train:\n  clip_rnge: 0.1\n")
    with pytest.raises(PxpoInputError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}: train.clip_rnge" in msg and "did you mean 'clip_range'" in msg and "learning_rate" in msg
    assert e.value.exit_code == 2


def test_wrong_type_names_file_and_field(tmp_path):
    p = _params(tmp_path, "sample:\n  num_steps: lots\n")
    with pytest.raises(PxpoInputError) as e:
        load_config(p)
    assert f"{p}: sample.num_steps" in str(e.value) and "integer" in str(e.value)
    p = _params(tmp_path, "train: 5\n")
    with pytest.raises(PxpoInputError, match="train: expected a mapping"):
        load_config(p)


@pytest.mark.parametrize(
    "override,text",
    [
        ("seed=true", "seed: True is not a number"),  # booleans are not numbers
        ("train.use_lora=1", "train.use_lora"),  # nor are numbers booleans
        ("model.path=null", "model.path: must not be empty"),
        ("sample.sampler=ddpm", "use one of ddim, lcm"),
        ("train.learning_rate=0", "must be > 0"),
        ("seed.x=1", "seed is not a section"),
        ("no_equals_sign", "expected section.field=value"),
    ],
)
def test_bad_overrides_blame_the_command_line(override, text):
    with pytest.raises(PxpoInputError) as e:
        load_config(None, [override])
    assert "command line" in str(e.value) and text in str(e.value)


def test_cross_field_error_names_file_when_overrides_are_not_involved(tmp_path):
    p = _params(tmp_path, "train:\n  batch_size: 5\n")
    with pytest.raises(PxpoInputError) as e:
        load_config(p, ["seed=3"])
    assert str(e.value).startswith(f"{p}: train.batch_size")


def test_nested_overrides_and_yaml_values(tmp_path):
    p = _params(tmp_path, "reward:\n  kwargs:\n    layout: left_bright\n")
    cfg = load_config(p, ["reward.kwargs.layout=top_bright", "train.learning_rate=1e-3", "model.revision=1234", "output_dir=2024-01-01"])
    assert cfg.reward.kwargs == {"layout": "top_bright"}
    assert cfg.train.learning_rate == 1e-3  # YAML reads 1e-3 as a string; it is still a number
    assert cfg.model.revision == "1234" and cfg.output_dir == "2024-01-01"  # numbers/dates kept as text


def test_round_trip_of_a_customised_config(tmp_path):
    cfg = load_config(None, ["sample.sampler=lcm", "sample.num_steps=4", "reward.kwargs={layout: top_bright}", "base.vae_steps=7"])
    again = load_config(_params(tmp_path, dump_config(cfg)))
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_assignment_is_validated():
    cfg = load_config(None)
    cfg.output_dir = "/tmp/x"
    cfg.pipeline.rounds = 5
    assert cfg.output_dir == "/tmp/x" and cfg.pipeline.rounds == 5
    with pytest.raises(PxpoInputError, match="train.clip_range"):
        cfg.train.clip_range = "wide"
    with pytest.raises(PxpoInputError, match="sample.eta"):
        cfg.sample.eta = 0.0


def test_section_classes_keep_their_names():
    from pxpo.config import PipelineConfig, PrepareConfig, TrainConfig

    assert PrepareConfig().heldout_fraction == 0.2 and TrainConfig().algorithm == "pxpo" and PipelineConfig().rounds == 3


# --- per-task sections (Kubeflow) ------------------------------------------------------------------

TASK = {"seed", "model", "prompts", "sample"}


def test_restricted_config_raises_on_sections_not_passed(tmp_path):
    cfg = load_config(None, ["sample.batch_size=4"], sections=TASK)
    assert cfg.sample.batch_size == 4 and cfg.seed == 0 and cfg.model.path
    with pytest.raises(PxpoInputError) as e:
        cfg.train.epochs
    assert "train.epochs" in str(e.value) and "not passed to this task" in str(e.value) and "sections" in str(e.value)
    with pytest.raises(PxpoInputError, match="output_dir.*not passed"):
        cfg.output_dir  # a top-level scalar raises when read
    with pytest.raises(PxpoInputError, match="not passed"):
        cfg.train.epochs = 3
    cfg.prompts.source = "x.txt"  # passed sections stay writable
    cfg.seed = 4
    cfg.output_dir = str(tmp_path)  # assigning a key not passed supplies it (the train stage sets its own run dir)
    assert cfg.prompts.source == "x.txt" and cfg.seed == 4 and cfg.output_dir == str(tmp_path)
    assert "output_dir" in cfg.to_dict() and "train" not in cfg.to_dict()


def test_restricted_config_dumps_only_passed_sections(tmp_path):
    cfg = load_config(None, ["sample.num_steps=7"], sections=TASK)
    assert list(cfg.to_dict()) == ["seed", "model", "prompts", "sample"]
    text = dump_config(cfg)
    assert "train" not in text and "num_steps: 7" in text
    again = load_config(_params(tmp_path, text), sections=TASK)
    assert again == cfg


def test_restricted_config_skips_checks_across_missing_sections(tmp_path):
    # sample.batch_size 4 with the default train.batch_size 8 only matters to a task that has both.
    p = _params(tmp_path, "sample:\n  batch_size: 4\n")
    assert load_config(p, sections=TASK).sample.batch_size == 4
    with pytest.raises(PxpoInputError, match="train.batch_size"):
        load_config(p)


def test_section_yaml_and_unknown_sections():
    import yaml

    from pxpo.config import section_yaml

    params = {"seed": 1, "sample": {"num_steps": 5}, "train": {"epochs": 2}, "base": {"vae_steps": 1}}
    text = section_yaml(params, ["seed", "sample", "output_dir"])
    assert yaml.safe_load(text) == {"seed": 1, "sample": {"num_steps": 5}}
    assert yaml.safe_load(section_yaml(yaml.safe_dump(params), ["train"])) == {"train": {"epochs": 2}}
    assert yaml.safe_load(section_yaml(load_config(None), ["pipeline"])) == {"pipeline": {"rounds": 3, "epochs_per_round": 1}}
    with pytest.raises(PxpoInputError, match="did you mean 'sample'"):
        section_yaml(params, ["sampel"])
    with pytest.raises(PxpoInputError, match="did you mean 'train'"):
        load_config(None, sections=["trian"])
