"""The loop with an SD3 pipeline: Flow-GRPO (flow_sde, windows, GRPO groups) and DiffusionNFT through `pxpo run`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pxpo.config import load_config
from pxpo.stages.online import run_online as run
from pxpo.tracking import JsonlTracker

FAST = ["sample.sampler=flow_sde", "sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1",
        "train.learning_rate=1e-2", "train.clip_range=0.1", "train.probe_every=0"]


def _cfg(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flow_grpo_with_groups_and_a_window_runs_and_saves_a_plain_sd3_lora(tmp_path, tiny_sd3_dir):
    extra = ["train.epochs=2", "sample.group_size=2", "train.advantage_mode=group", "sample.sde_window_start=1", "sample.sde_window_size=1"]
    cfg = _cfg(tiny_sd3_dir, tmp_path / "r", *extra)
    summary = run(cfg, JsonlTracker(tmp_path / "r"), progress=False)
    assert summary["completed_epochs"] == 2
    hist = _history(tmp_path / "r")
    assert hist[0]["optimizer_steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[0]["ratio_dev_max"] < 1e-3  # the first update re-scores the window exactly (ratio 1)
    lora = load_file(str(tmp_path / "r" / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any("add_q_proj" in k for k in lora)  # both streams of the joint attention
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)

    # diffusers' own SD3 pipeline loads it, and it changes the samples
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=16, width=16, output_type="pt")
    before = pipe("a handwritten digit 1", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(tmp_path / "r" / "lora"))
    after = pipe("a handwritten digit 1", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("algorithm", ["nft", "nft_scalar"])
def test_nft_trains_on_the_forward_process(tmp_path, tiny_sd3_dir, algorithm):
    cfg = _cfg(tiny_sd3_dir, tmp_path / "n", "train.epochs=2", f"train.algorithm={algorithm}", "sample.noise_level=0.0")
    run(cfg, JsonlTracker(tmp_path / "n"), progress=False)
    hist = _history(tmp_path / "n")
    assert {"nft_positive", "nft_negative", "nft_old_deviation"} <= set(hist[0])
    assert hist[0]["optimizer_steps"] == 2 and torch.isfinite(torch.tensor(hist[1]["loss"]))
    assert hist[1]["nft_old_deviation"] > 0  # v_old is the sampling policy's, not the moving weights'
    lora = load_file(str(tmp_path / "n" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_the_kl_penalty_works_with_the_flow_sampler(tmp_path, tiny_sd3_dir):
    """The reference re-scores the flow SDE's window steps: kl_ref is logged, > 0 once the policy moved, and it changes the update."""
    for coef in (0.0, 5.0):
        run(_cfg(tiny_sd3_dir, tmp_path / f"kl{coef}", "train.epochs=2", f"train.kl_coef={coef}"), JsonlTracker(tmp_path / f"kl{coef}"), progress=False)
    hist = _history(tmp_path / "kl5.0")
    assert all(torch.isfinite(torch.tensor(h["kl_ref"])) for h in hist) and hist[1]["kl_ref"] > 0, hist
    assert "kl_ref" not in _history(tmp_path / "kl0.0")[0]
    a, b = (load_file(str(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors")) for d in ("kl0.0", "kl5.0"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_loaded_sd3_pipeline_speaks_the_loops_names(tiny_sd3_dir):
    from pxpo.core.flow import FlowSDEPolicy
    from pxpo.core.policies import make_policy
    from pxpo.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd3_dir), sampler="flow_sde")
    assert pipe.unet is pipe.transformer and pipe.text_encoder_3 is None
    cfg = load_config(None, FAST)
    assert isinstance(make_policy(cfg.sample, pipe.scheduler), FlowSDEPolicy)


def test_registered_model_wrapper_generates_with_the_flow_sampler(tmp_path, tiny_sd3_dir):
    """The MLflow pyfunc's load/predict path (pxpo.mlflow.pyfunc) on an SD3 base and a trained SD3 LoRA."""
    from types import SimpleNamespace

    from pxpo.mlflow.pyfunc import DiffusersPolicyModel, decode_image

    run(_cfg(tiny_sd3_dir, tmp_path / "r", "train.epochs=1"), JsonlTracker(tmp_path / "r"), progress=False)
    model = DiffusersPolicyModel()
    ctx = SimpleNamespace(model_config={"sampler": "flow_sde", "num_inference_steps": 3}, artifacts={"base": str(tiny_sd3_dir), "policy": str(tmp_path / "r")})
    model.load_context(ctx)
    assert type(model.pipe).__name__ == "StableDiffusion3Pipeline" and type(model.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    out = model.predict(ctx, "a handwritten digit 4")
    assert decode_image(out["image"][0]).size == (16, 16)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.algorithm=nft"], "train.algorithm"),  # NFT needs the flow sampler
        (["sample.sampler=flow_sde", "sample.noise_level=0"], "sample.noise_level"),  # policy gradients need a stochastic step
        (["sample.sampler=flow_sde", "sample.sde_window_start=19", "sample.sde_window_size=2"], "sample.sde_window_start"),
        (["sample.group_size=5"], "sample.group_size"),  # 5 does not divide 32 samples
        (["train.advantage_mode=group"], "sample.group_size"),  # groups of one
    ],
)
def test_flow_and_group_settings_are_checked(overrides, field):
    from pxpo.errors import PxpoInputError

    with pytest.raises(PxpoInputError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_prompt_groups():
    from pxpo.prompts import PromptSource

    src = PromptSource.load("digits")
    assert src.draw_groups(12, 1, 7) == src.draw(12, 7)  # group_size 1: the draws of before
    g = src.draw_groups(12, 4, 7)
    assert len(g) == 12 and all(len(set(g[i : i + 4])) == 1 for i in range(0, 12, 4)) and g[::4] == src.draw(3, 7)


def test_nft_honours_the_kl_coefficient_and_reports_no_ratio(tmp_path, tiny_sd3_dir):
    """`pxpo run train.algorithm=nft sample.sampler=flow_sde train.kl_coef=1`: kl_ref is logged, > 0 after the first
    epoch, and the penalty changes the update; NFT has no importance ratio, so no ratio figure is logged."""
    for coef in (0.0, 1.0):
        d = tmp_path / f"nft{coef}"
        run(_cfg(tiny_sd3_dir, d, "train.epochs=2", "train.algorithm=nft", f"train.kl_coef={coef}"), JsonlTracker(d), progress=False)
    hist = _history(tmp_path / "nft1.0")
    assert all(torch.isfinite(torch.tensor(h["kl_ref"])) for h in hist) and hist[1]["kl_ref"] > 0, hist
    plain = _history(tmp_path / "nft0.0")
    for h in (*hist, *plain):
        assert "ratio_dev_max" not in h and "approx_kl" not in h and "clipfrac" not in h, h  # measured or absent
        assert h["nft_old_deviation"] >= 0
    assert "kl_ref" not in plain[0]
    a, b = (load_file(str(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors")) for d in ("nft0.0", "nft1.0"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_nft_old_policy_forward_runs_without_autograd(tmp_path, tiny_sd3_dir):
    """Per chunk: one forward with gradients (the trained velocity), one without (v_old), none with DDP's bookkeeping."""
    from pxpo.training.loop import train_on_trajectories
    from pxpo.training.rollout import sample_trajectories
    from pxpo.training.state import build_train_state

    cfg = _cfg(tiny_sd3_dir, tmp_path / "g", "train.algorithm=nft", "train.compute_batch=2")
    pipe, state = build_train_state(cfg)
    traj = sample_trajectories(pipe, cfg, ["a handwritten digit 1"] * 4, [0, 1, 2, 3], policy=state.policy)
    grad_modes = []
    net = state.accelerator.unwrap_model(state.unet)
    hook = net.register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    logs = train_on_trajectories(state, traj, torch.randn(4), cfg, epoch=0)
    hook.remove()
    assert logs["optimizer_steps"] == 2 and "ratio_dev_max" not in logs
    assert len(grad_modes) % 2 == 0 and grad_modes.count(False) == grad_modes.count(True) > 0


def test_every_algorithm_the_config_accepts_has_one_objective():
    import typing

    from pxpo.config import TrainConfig
    from pxpo.config.algorithms import ALGORITHMS

    assert set(typing.get_args(TrainConfig.model_fields["algorithm"].annotation)) == set(ALGORITHMS)


def test_sd3_prompts_get_sample_max_sequence_length_t5_tokens(tmp_path, tiny_sd3_dir):
    """sample.max_sequence_length sets the T5 part of SD3's prompt embedding (256 by default, as diffusers)."""
    from pxpo.training.rollout import sample_trajectories
    from pxpo.training.state import build_train_state

    lengths = {}
    for n in (256, 16):
        cfg = _cfg(tiny_sd3_dir, tmp_path / f"t{n}", f"sample.max_sequence_length={n}", "sample.batch_size=2")
        pipe, state = build_train_state(cfg)
        traj = sample_trajectories(pipe, cfg, ["a handwritten digit 1"] * 2, [0, 1], policy=state.policy)
        lengths[n] = traj.cond().embeds.shape[1]
    assert lengths[256] - lengths[16] == 240
    assert load_config(None, []).sample.max_sequence_length == 256
