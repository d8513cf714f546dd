"""The per-element Gaussian KL to the reference (pxpo.core.kl): hand-computed values, the general form, I7."""

import math

import pytest
import torch

from pxpo.core.kl import gaussian_kl, step_kl, weighted_kl_mean


def test_equal_std_closed_form_by_hand():
    # (mu_p - mu_ref)^2 / (2 s^2): (1 - 0)^2 / (2 * 0.25) = 2; (0.5 - 1.5)^2 / (2 * 0.25) = 2; (3 - 3)^2 ... = 0
    mp, mr = torch.tensor([1.0, 0.5, 3.0]), torch.tensor([0.0, 1.5, 3.0])
    torch.testing.assert_close(gaussian_kl(mp, mr, 0.5), torch.tensor([2.0, 2.0, 0.0]))
    # per-sample std broadcast over elements: s = 0.1 -> 0.3^2 / 0.02 = 4.5
    kl = gaussian_kl(torch.full((2, 1, 2, 2), 0.3), torch.zeros(2, 1, 2, 2), torch.tensor([0.1, 1.0]).view(2, 1, 1, 1))
    torch.testing.assert_close(kl[:, 0, 0, 0], torch.tensor([4.5, 0.045]))


def test_unequal_std_by_hand_and_against_torch():
    # s_p = 1, s_r = 2, equal means: log 2 + 1/8 - 1/2 = 0.318147...
    assert gaussian_kl(torch.tensor([0.0]), torch.tensor([0.0]), 1.0, 2.0).item() == pytest.approx(math.log(2) + 0.125 - 0.5)
    # s_p = 2, s_r = 1, means 1 apart: log(1/2) + (4 + 1) / 2 - 1/2 = 2 - log 2
    assert gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]), 2.0, 1.0).item() == pytest.approx(2 - math.log(2))
    g = torch.Generator().manual_seed(0)
    mp, mr = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sp, sr = torch.rand(3, 4, generator=g) + 0.1, torch.rand(3, 4, generator=g) + 0.1
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mp, sp), torch.distributions.Normal(mr, sr))
    torch.testing.assert_close(gaussian_kl(mp, mr, sp, sr), want)
    # the general form reduces to the closed form when the stds are equal
    torch.testing.assert_close(gaussian_kl(mp, mr, sp, sp), gaussian_kl(mp, mr, sp), atol=1e-6, rtol=1e-5)


def test_kl_of_a_policy_to_itself_is_zero_and_grad_flows_through_the_policy_mean():
    class Step:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

    mean = torch.randn(2, 4, 3, 3, requires_grad=True)
    std = torch.full((2, 1, 1, 1), 0.2)
    assert step_kl(Step(mean, std), Step(mean.detach(), std)).abs().max() == 0
    ref = Step(torch.zeros(2, 4, 3, 3), std)
    kl = step_kl(Step(mean, std), ref)
    kl.mean().backward()
    torch.testing.assert_close(mean.grad, mean.detach() / (0.04 * kl.numel()))  # d/dmu of mu^2 / (2 s^2), mean over elements
    assert step_kl(Step(mean, std), Step(mean.detach(), std * 2)).min() > 0  # unequal stds: the general form


def test_weighted_mean_weights_pixels():
    kl = torch.tensor([[[[1.0, 3.0]]]])
    assert weighted_kl_mean(kl).item() == 2.0
    assert weighted_kl_mean(kl, torch.tensor([[[[1.0, 0.0]]]])).item() == 1.0
    assert weighted_kl_mean(kl, torch.tensor([[[[1.0, 3.0]]]])).item() == pytest.approx(2.5)


# ----- the KL penalty in training (train.kl_coef; pxpo.training.reference) ------------------------------------------

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1", "train.learning_rate=1e-2", "train.clip_range=0.1"]


def _cfg(model_dir, out, *extra):
    from pxpo.config import load_config

    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])


def test_kl_coef_0_backpropagates_todays_loss_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    """kl_coef 0 (the default): no reference is built or called, and what is back-propagated is exactly the
    policy loss (times the chunk weight), as before; kl_coef > 0 adds kl_coef x the KL and one reference pass."""
    import pxpo.training.objectives
    from pxpo.training.rollout import sample_trajectories
    from pxpo.training.loop import train_on_trajectories
    from pxpo.training.state import build_train_state

    def one_step(coef):
        cfg = _cfg(tiny_model_dir, tmp_path / f"r{coef}", f"train.kl_coef={coef}", "train.batch_size=4")
        pipe, state = build_train_state(cfg)  # state.reference: built with the state when kl_coef > 0
        traj = sample_trajectories(pipe, cfg, ["a handwritten digit 1"] * 4, [0, 1, 2, 3], policy=state.policy)
        losses, backward, calls = [], [], {"n": 0}
        real_loss = pxpo.training.objectives.pxpo_loss

        def spy_loss(log_prob, *a, **k):
            res = real_loss(log_prob, *a, **k)
            losses.append((log_prob.shape[0], res.loss.detach().clone()))
            return res

        monkeypatch.setattr(pxpo.training.objectives, "pxpo_loss", spy_loss)
        real_backward = state.accelerator.backward
        monkeypatch.setattr(state.accelerator, "backward", lambda loss, **k: backward.append(loss.detach().clone()) or real_backward(loss, **k))
        net = state.accelerator.unwrap_model(state.unet)
        hook = net.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        logs = train_on_trajectories(state, traj, torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)), cfg, epoch=0)
        hook.remove()
        return state, losses, backward, calls["n"], logs

    state, losses, backward, n0, logs = one_step(0.0)
    assert state.reference is None and "kl_ref" not in logs and logs["optimizer_steps"] == 1
    pairs = sum(k for k, _ in losses)  # one optimizer step: 4 samples x 3 timesteps
    assert pairs == 12 and len(backward) == len(losses)
    gas = state.accelerator.gradient_accumulation_steps
    for (k, loss), sent in zip(losses, backward):
        assert torch.equal(sent, loss * (k * (1.0 / pairs) * gas))  # the policy loss, weighted, nothing added
    _, losses_kl, backward_kl, n1, logs_kl = one_step(5.0)
    assert n1 == 2 * n0  # one extra (reference) forward per chunk, none without the penalty
    assert logs_kl["kl_ref"] == 0.0  # before the first step the LoRA policy IS the reference (B = 0): KL 0 ...
    assert all(torch.equal(a, b) for a, b in zip(backward_kl, backward))  # ... and the loss is unchanged


def test_lora_reference_is_the_same_network_with_adapters_off(tiny_model_dir, tmp_path):
    """With LoRA the reference holds no second copy (parameter memory does not double); full fine-tuning: a frozen copy."""
    from diffusers import UNet2DConditionModel

    from pxpo.training.reference import Reference, parameter_bytes
    from pxpo.training.state import build_train_state

    cfg = _cfg(tiny_model_dir, tmp_path / "lora", "train.kl_coef=1.0")
    _, state = build_train_state(cfg)
    ref = state.reference
    net = state.accelerator.unwrap_model(state.unet)
    assert ref.lora and ref.modules() == []
    assert parameter_bytes(net, *ref.modules()) == parameter_bytes(net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 16, 32)
    with torch.no_grad():
        tuned = net(x, t, encoder_hidden_states=c).sample
        with ref.network() as r:
            off = r(x, t, encoder_hidden_states=c).sample
        again = net(x, t, encoder_hidden_states=c).sample
        want = base(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(off, want, atol=1e-5, rtol=1e-4)  # adapters off = the base model
    assert not torch.allclose(tuned, want, atol=1e-3) and torch.equal(again, tuned)  # and back on afterwards

    full = _cfg(tiny_model_dir, tmp_path / "full", "train.kl_coef=1.0", "train.use_lora=false")
    _, fstate = build_train_state(full)
    fref = fstate.reference
    fnet = fstate.accelerator.unwrap_model(fstate.unet)
    assert parameter_bytes(fnet, *fref.modules()) == 2 * parameter_bytes(fnet)
    assert not any(p.requires_grad for p in fref.frozen.parameters())
    assert Reference.build(fstate.accelerator, fstate.unet, _cfg(tiny_model_dir, tmp_path / "off").train) is None  # kl_coef 0: nothing built


def _held_out(model_dir, policy, n=64):
    """(mean all_bright reward, images) of n fixed prompts and seeds; policy None: the base."""
    from pxpo.config import load_config
    from pxpo.labellers import make_reward
    from pxpo.models import load_configured_pipeline, load_policy_into
    from pxpo.training.rollout import label_images, sample_trajectories

    cfg = load_config(None, [f"model.path={model_dir}", "sample.num_steps=3", "sample.batch_size=32", "reward.name=brightness_target", "reward.kwargs={layout: all_bright}"])
    pipe = load_configured_pipeline(cfg)
    if policy is not None:
        load_policy_into(pipe, str(policy))
    prompts = [f"a handwritten digit {i % 10}" for i in range(n)]
    traj = sample_trajectories(pipe, cfg, prompts, list(range(1000, 1000 + n)))
    maps, _ = label_images(make_reward(cfg.reward), traj.images, prompts)
    return float(maps.mean()), traj.images


def test_a_large_kl_coef_keeps_the_policy_near_the_reference(tiny_vae_model_dir, tmp_path):
    """8 epochs on `all_bright` (learnable on the VAE-trained tiny model): without KL the policy drifts far;
    with kl_coef 1 it stays within a quarter of that distance, and the reward still rises a little."""
    from pxpo.stages.online import run_online

    common = ["reward.name=brightness_target", "reward.kwargs={layout: all_bright}", "train.epochs=8", "train.learning_rate=3e-2", "sample.batch_size=16", "train.batch_size=8"]
    runs = {}
    for coef in (0.0, 1.0):
        cfg = _cfg(tiny_vae_model_dir, tmp_path / f"kl{coef}", *common, f"train.kl_coef={coef}", "train.save_every=100")
        run_online(cfg, progress=False)
        runs[coef] = _held_out(tiny_vae_model_dir, tmp_path / f"kl{coef}")
    base_reward, base_images = _held_out(tiny_vae_model_dir, None)
    (r0, im0), (r1, im1) = runs[0.0], runs[1.0]
    drift0, drift1 = float((im0 - base_images).abs().mean()), float((im1 - base_images).abs().mean())
    assert drift1 < drift0 / 4, (drift0, drift1)
    assert r0 - base_reward > 0.02 and 0 < r1 - base_reward < r0 - base_reward, (base_reward, r0, r1)


def test_full_finetune_reference_is_the_base_model_after_a_resume(tiny_model_dir, tmp_path):
    """The frozen copy is taken before a checkpoint is loaded: a killed and resumed run ends where an uninterrupted one does."""
    from safetensors.torch import load_file

    from pxpo.stages.online import run_online

    extra = ["train.use_lora=false", "train.learning_rate=1e-3", "train.kl_coef=1.0", "train.epochs=3"]
    run_online(_cfg(tiny_model_dir, tmp_path / "full", *extra), progress=False)
    part = _cfg(tiny_model_dir, tmp_path / "part", *extra)
    run_online(part, progress=False, stop_after_epochs=2)
    run_online(part, progress=False)  # resumes from epoch 2: its reference must still be the base model
    a = load_file(str(tmp_path / "full" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def test_the_kl_penalty_works_with_the_lcm_sampler(tiny_lcm_model_dir, tmp_path):
    """The reference re-scores the LCM policy's steps: kl_ref is logged, > 0 once the policy moved, and it changes the update."""
    import json

    from pxpo.stages.online import run_online

    extra = ["train.epochs=2", "sample.sampler=lcm", "sample.num_steps=4", "train.probe_every=0"]
    for coef in (0.0, 5.0):
        run_online(_cfg(tiny_lcm_model_dir, tmp_path / f"kl{coef}", *extra, f"train.kl_coef={coef}"), progress=False)
    hist = [json.loads(x) for x in (tmp_path / "kl5.0" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["kl_ref"]) for h in hist) and hist[1]["kl_ref"] > 0, hist
    assert "kl_ref" not in json.loads((tmp_path / "kl0.0" / "metrics.jsonl").read_text().splitlines()[0])
    a, b = _trained(tmp_path / "kl0.0"), _trained(tmp_path / "kl5.0")
    assert any(not torch.equal(a[k], b[k]) for k in a)
