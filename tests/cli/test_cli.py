"""The CLI end to end on the tiny random model, and bad input -> exit 2 with no artifact."""

import json

import pytest
import torch

from pxpo.cli import main
from pxpo.core import rewards

@pytest.fixture(autouse=True)
def _no_project_params(tmp_path, monkeypatch):
    """Run outside the repo so ./params.yaml (the embedded default's settings) is not picked up."""
    monkeypatch.chdir(tmp_path)


FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.epochs=2", "train.save_every=1"]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_label_train_chain(tmp_path, tiny_model_dir, capsys):
    m = f"model.path={tiny_model_dir}"
    t = tmp_path / "traj"
    code, out, err = _run(["sample", "--quiet", "--out", str(t), m, *FAST], capsys)
    assert code == 0, err
    assert (t / "trajectories.safetensors").is_file() and len(list((t / "images").glob("*.png"))) == 4
    code, out, err = _run(["label", "--quiet", "--trajectories", str(t), m, *FAST], capsys)
    assert code == 0, err
    assert (t / "reward_maps.safetensors").is_file()
    code, out, err = _run(["train", "--quiet", "--trajectories", str(t), "--out", str(tmp_path / "r0"), "--rounds", "1", m, *FAST], capsys)
    assert code == 0, err
    assert (tmp_path / "r0" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    metrics = [json.loads(x) for x in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["optimizer_steps"] == 2
    assert json.loads((tmp_path / "r0" / "pxpo_round.json").read_text())["completed_rounds"] == 1
    # second round samples from the first round's policy and continues its optimizer + stat tracker
    t1 = tmp_path / "traj1"
    assert _run(["sample", "--quiet", "--out", str(t1), "--policy", str(tmp_path / "r0"), m, *FAST], capsys)[0] == 0
    assert json.loads((t1 / "meta.json").read_text())["epoch"] == 1
    assert _run(["label", "--quiet", "--trajectories", str(t1), m, *FAST], capsys)[0] == 0
    code, out, err = _run(
        ["train", "--quiet", "--trajectories", str(t1), "--out", str(tmp_path / "r1"), "--state", str(tmp_path / "r0"), "--rounds", "2", m, *FAST], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "r1" / "pxpo_round.json").read_text())["completed_rounds"] == 3
    # the output's history is the whole run's (round 1's epoch, then this round's), as `pxpo run`'s is
    assert [json.loads(x)["epoch"] for x in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    line = out.strip().splitlines()[-1]  # the stage's summary still lists this round's two epochs only
    assert line.startswith("trained 2 round(s) to epoch 3: reward ") and line.count(" -> ") == 1, out


def test_stage_chain_equals_online_run(tmp_path, tiny_model_dir, capsys):
    """sample(epoch 0) -> label -> train --rounds 2 reaches the same weights as `pxpo run` for 2 epochs."""
    from safetensors.torch import load_file

    m = f"model.path={tiny_model_dir}"
    t = tmp_path / "traj"
    assert _run(["sample", "--quiet", "--out", str(t), m, *FAST], capsys)[0] == 0
    assert _run(["label", "--quiet", "--trajectories", str(t), m, *FAST], capsys)[0] == 0
    assert _run(["train", "--quiet", "--trajectories", str(t), "--out", str(tmp_path / "staged"), "--rounds", "2", m, *FAST], capsys)[0] == 0
    assert _run(["run", "--quiet", m, *FAST, f"output_dir={tmp_path / 'online'}"], capsys)[0] == 0
    a = load_file(str(tmp_path / "staged" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "online" / "lora" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)  # PNG-quantised images give the same maps


def test_train_refuses_mismatched_sampling_settings(tmp_path, tiny_model_dir, capsys):
    m = f"model.path={tiny_model_dir}"
    t = tmp_path / "traj"
    assert _run(["sample", "--quiet", "--out", str(t), m, *FAST], capsys)[0] == 0
    assert _run(["label", "--quiet", "--trajectories", str(t), m, *FAST], capsys)[0] == 0
    code, _, err = _run(["train", "--quiet", "--trajectories", str(t), "--out", str(tmp_path / "o"), m, *FAST, "sample.guidance_scale=7.0"], capsys)
    assert code == 2 and "sample.guidance_scale" in err
    assert not (tmp_path / "o").exists()
    code, _, err = _run(["train", "--quiet", "--trajectories", str(t), "--out", str(tmp_path / "o"), "--state", str(tmp_path), m, *FAST], capsys)
    assert code == 2 and "pxpo_round.json" in err
    assert not (tmp_path / "o").exists()


def test_labellers_lists_registry(capsys):
    code, out, _ = _run(["labellers"], capsys)
    assert code == 0 and "brightness_target" in out and "jpeg_block" in out


@pytest.fixture
def bad_labellers():
    @rewards.register("_test_nan")
    def _nan():
        def fn(images, prompts):
            m = torch.zeros(images.shape[0], *images.shape[-2:])
            m[0, 0, 0] = float("nan")
            return m, {}

        return fn

    @rewards.register("_test_shape")
    def _shape():
        return lambda images, prompts: (torch.zeros(images.shape[0], 3, 3), {})

    yield
    rewards.REGISTRY.pop("_test_nan")
    rewards.REGISTRY.pop("_test_shape")


def test_bad_reward_maps_stop_labelling_without_writing(tmp_path, tiny_model_dir, capsys, bad_labellers):
    m = f"model.path={tiny_model_dir}"
    t = tmp_path / "traj"
    assert _run(["sample", "--quiet", "--out", str(t), m, *FAST], capsys)[0] == 0
    for name, msg in [("_test_nan", "NaN"), ("_test_shape", "shape")]:
        code, _, err = _run(["label", "--quiet", "--trajectories", str(t), m, *FAST, f"reward.name={name}", "reward.kwargs={}"], capsys)
        assert code == 2 and msg in err and "labeller" in err
        assert not (t / "reward_maps.safetensors").exists()
        assert not list(t.glob(".reward_maps*"))


@pytest.mark.parametrize(
    "setup,args,expect",
    [
        (None, ["model.path=/nonexistent/model"], "model.path=/nonexistent/model: directory not found"),
        ("empty_dir", [], "model_index.json"),
        ("corrupt_model", [], "could not be loaded"),
        ("empty_prompts", [], "contains no prompts"),
        ("bad_jsonl", [], "prompts.jsonl:2"),
        (None, ["sample.eta=0"], "sample.eta"),
        (None, ["train.batch_size=3"], "train.batch_size"),
        (None, ["reward.name=nope"], "nope"),
    ],
)
def test_bad_input_exits_2_with_named_input(tmp_path, tiny_model_dir, capsys, setup, args, expect):
    m = [f"model.path={tiny_model_dir}"]
    if setup == "empty_dir":
        (tmp_path / "m").mkdir()
        m = [f"model.path={tmp_path / 'm'}"]
    elif setup == "corrupt_model":
        import shutil

        shutil.copytree(tiny_model_dir, tmp_path / "m")
        (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
        m = [f"model.path={tmp_path / 'm'}"]
    elif setup == "empty_prompts":
        (tmp_path / "prompts.txt").write_text("\n# only a comment\n")
        m.append(f"prompts.source={tmp_path / 'prompts.txt'}")
    elif setup == "bad_jsonl":
        (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
        m.append(f"prompts.source={tmp_path / 'prompts.jsonl'}")
    out_dir = tmp_path / "run"
    code, _, err = _run(["run", "--quiet", *FAST, *m, f"output_dir={out_dir}", *args], capsys)
    assert code == 2, err
    assert expect in err and "Fix:" in err
    assert not out_dir.exists() or not any(out_dir.iterdir())
    code, _, err = _run(["sample", "--quiet", "--out", str(tmp_path / "t"), *FAST, *m, *args], capsys)
    assert code == 2 and expect in err
    assert not (tmp_path / "t").exists()


def test_lcm_stage_chain(tmp_path, tiny_lcm_model_dir, capsys):
    """sampler=lcm through sample -> label -> train; the artifact records the sampler; a mismatch is refused."""
    m_dir = tiny_lcm_model_dir
    m = [f"model.path={m_dir}", "sample.sampler=lcm", "sample.num_steps=2", *FAST]
    t = tmp_path / "traj"
    assert _run(["sample", "--quiet", "--out", str(t), "--validate", *m], capsys)[0] == 0
    assert json.loads((t / "meta.json").read_text())["sampler"] == "lcm"
    assert _run(["label", "--quiet", "--trajectories", str(t), "--out", str(tmp_path / "lab"), "--validate", *m], capsys)[0] == 0
    code, _, err = _run(["train", "--quiet", "--trajectories", str(tmp_path / "lab"), "--out", str(tmp_path / "r"), "--rounds", "1", *m], capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    code, _, err = _run(["train", "--quiet", "--trajectories", str(tmp_path / "lab"), "--out", str(tmp_path / "r2"), *m, "sample.sampler=ddim", "sample.num_steps=2"], capsys)
    assert code == 2 and "sample.sampler" in err
