"""The online loop on the tiny random model: runs, logs, saves a loadable LoRA, resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pxpo.config import load_config
from pxpo.tracking import JsonlTracker
from pxpo.stages.online import run_online as run

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1", "train.learning_rate=1e-2", "train.clip_range=0.1"]


def _cfg(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])


def test_run_writes_metrics_curve_and_loadable_lora(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, tmp_path / "r", "train.epochs=2")
    summary = run(cfg, JsonlTracker(tmp_path / "r"), progress=False)
    assert summary["completed_epochs"] == 2
    hist = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1]
    for key in ("reward_mean", "reward_std", "approx_kl", "clipfrac", "grad_norm", "time_sample", "time_train"):
        assert key in hist[0]
    assert hist[0]["optimizer_steps"] == 2
    assert (tmp_path / "r" / "reward_curve.png").stat().st_size > 1000
    lora = load_file(str(tmp_path / "r" / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)

    # diffusers' own loader takes it, and it changes the samples
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=16, width=16, output_type="pt")
    before = pipe("a handwritten digit 1", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(tmp_path / "r" / "lora"))
    after = pipe("a handwritten digit 1", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(before, after)


def _params(run_dir):
    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("algorithm", ["pxpo", "ddpo"])
def test_killed_run_resumes_to_identical_parameters(tmp_path, tiny_model_dir, algorithm):
    extra = ["train.epochs=3", f"train.algorithm={algorithm}", "train.min_count=2", "train.buffer_size=4"]
    full = _cfg(tiny_model_dir, tmp_path / "full", *extra)
    run(full, JsonlTracker(tmp_path / "full"), progress=False)

    part = _cfg(tiny_model_dir, tmp_path / "part", *extra)
    s = run(part, JsonlTracker(tmp_path / "part"), progress=False, stop_after_epochs=2)  # "killed" after epoch 2
    assert s["completed_epochs"] == 2 and not (tmp_path / "part" / "lora").exists()
    s = run(part, JsonlTracker(tmp_path / "part"), progress=False)  # resumes from checkpoints/epoch_0001
    assert s["completed_epochs"] == 3

    a, b = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [h["reward_mean"] for h in ha] == [h["reward_mean"] for h in hb]


def test_full_finetune_saves_unet(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, tmp_path / "r", "train.epochs=1", "train.use_lora=false")
    run(cfg, JsonlTracker(tmp_path / "r"), progress=False)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "r" / "model" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), base.parameters()))


@pytest.mark.parametrize("algorithm", ["pxpo", "ddpo"])
def test_lcm_sampler_trains_and_resumes_exactly(tmp_path, tiny_lcm_model_dir, algorithm):
    m = tiny_lcm_model_dir
    extra = ["train.epochs=2", f"train.algorithm={algorithm}", "sample.sampler=lcm", "sample.num_steps=4"]
    full = _cfg(m, tmp_path / "full", *extra)
    run(full, JsonlTracker(tmp_path / "full"), progress=False)
    part = _cfg(m, tmp_path / "part", *extra)
    run(part, JsonlTracker(tmp_path / "part"), progress=False, stop_after_epochs=1)
    run(part, JsonlTracker(tmp_path / "part"), progress=False)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["optimizer_steps"] == 2 and abs(hist[0]["ratio"] - 1) < 0.5
