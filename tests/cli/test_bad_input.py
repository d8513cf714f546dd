"""Bad input through the CLI (issue 12): unknown top-level params key, integer reward maps -> exit 2."""

import pytest
import torch

from pxpo.cli import main


@pytest.fixture(autouse=True)
def _no_project_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.epochs=1"]


def test_unknown_top_level_params_key_exits_2(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train_extra: 1\ntrain:\n  epochs: 1\n")
    code = main(["run", "--quiet", "--params", str(params), f"output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(params) in err and "train_extra" in err and "Fix:" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_train_on_int8_reward_maps_exits_2(tmp_path, tiny_model_dir, capsys, dtype):
    """int8 maps used to crash `pxpo train` with `mean(): could not infer output dtype` (exit 1); float16 is converted."""
    from safetensors.torch import save_file

    m = f"model.path={tiny_model_dir}"
    t = tmp_path / "traj"
    assert main(["sample", "--quiet", "--out", str(t), m, *FAST]) == 0
    maps = (torch.rand(4, 16, 16) * 100).to(dtype)
    save_file({"maps": maps}, str(t / "reward_maps.safetensors"))
    code = main(["train", "--quiet", "--trajectories", str(t), "--out", str(tmp_path / "r0"), "--rounds", "1", m, *FAST])
    err = capsys.readouterr().err
    if dtype == torch.int8:
        assert code == 2, err
        assert "reward_maps.safetensors" in err and "int8" in err and "Fix:" in err
        assert not (tmp_path / "r0").exists() or not any((tmp_path / "r0").iterdir())
    else:
        assert code == 0, err
