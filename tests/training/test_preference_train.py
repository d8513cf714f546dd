"""Region-level preferences (issue 24) on the tiny random models: aligned pairs in the sampler, the objectives on a real
UNet (m = +1 is D3PO / Diffusion-DPO exactly, loss and gradients) and `pxpo run` with both algorithms."""

import json

import pytest
import torch
import torch.nn.functional as F

from pxpo.config import load_config
from pxpo.stages.online import run_online as run
from pxpo.tracking import JsonlTracker

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1", "train.learning_rate=1e-2",
        "train.probe_every=0", "sample.pairs=true"]


def _cfg(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shared", [0, 2])
def test_pairs_share_the_initial_noise_and_k_steps_then_branch(tmp_path, tiny_pipe, shared):
    from pxpo.training.rollout import sample_trajectories
    from pxpo.trajectories import load_trajectories, save_trajectories

    cfg = _cfg("unused", tmp_path, f"sample.pair_shared_steps={shared}", "sample.num_steps=4", "sample.compute_batch=3")
    prompts = ["a handwritten digit 1"] * 2 + ["a handwritten digit 7"] * 2
    traj = sample_trajectories(tiny_pipe, cfg, prompts, [11, 12, 13, 14])
    lat = traj.latents  # (4, T+1, C, h, w); compute batches of 3 split pair 1: the samples must not depend on it
    for a in (0, 2):
        for i in range(shared + 1):  # x_T and the first `shared` steps are A's
            torch.testing.assert_close(lat[a, i], lat[a + 1, i], rtol=0, atol=1e-4)  # (batches differ in float order)
        assert (lat[a, shared + 1] - lat[a + 1, shared + 1]).abs().max() > 0.1  # then B branches
    assert not torch.allclose(lat[0, 0], lat[2, 0])  # pairs differ from each other
    # A is the unpaired sample of its own seed; B continues from its own seed after the branch
    plain = sample_trajectories(tiny_pipe, load_config(None, ["sample.batch_size=4", "train.batch_size=2", "sample.num_steps=4"]), prompts[:1], [11])
    torch.testing.assert_close(plain.latents[0], lat[0], rtol=1e-4, atol=1e-4)
    save_trajectories(traj, tmp_path / "t")
    recs = [json.loads(x) for x in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    assert [(r["pair"], r["side"]) for r in recs] == [(0, "A"), (0, "B"), (1, "A"), (1, "B")]
    assert load_trajectories(tmp_path / "t").meta["pairs"] == {"shared_steps": shared}


def test_pairs_config_checks():
    from pxpo.errors import PxpoInputError

    with pytest.raises(PxpoInputError, match="sample.pairs"):
        load_config(None, ["train.algorithm=d3po"])
    with pytest.raises(PxpoInputError, match="pair_shared_steps"):
        load_config(None, ["sample.pairs=true", "sample.num_steps=3", "sample.pair_shared_steps=3", "sample.batch_size=4", "train.batch_size=2"])
    with pytest.raises(PxpoInputError, match="group_size"):
        load_config(None, ["sample.pairs=true", "sample.group_size=3", "sample.batch_size=6", "train.batch_size=6"])
    with pytest.raises(PxpoInputError, match="train.algorithm"):
        load_config(None, ["sample.pairs=true", "train.algorithm=diffusion_dpo", "sample.sampler=lcm"])


def _objective_setup(tmp_path, model_dir, algorithm):
    """A built train state whose weights moved away from the reference, an epoch's data with m = +1, a chunk context."""
    from pxpo.training.objectives import make_objective
    from pxpo.training.rollout import sample_trajectories
    from pxpo.training.state import build_train_state
    from pxpo.training.step import EpochData
    from pxpo.training.chunks import ChunkContext

    cfg = _cfg(model_dir, tmp_path, f"train.algorithm={algorithm}", "train.use_lora=false", "train.kl_coef=0")
    pipe, state = build_train_state(cfg)
    assert state.reference is not None  # built for a preference algorithm even with kl_coef 0
    traj = sample_trajectories(pipe, cfg, ["a handwritten digit 1"] * 2 + ["a handwritten digit 3"] * 2, [1, 2, 3, 4])
    with torch.no_grad():  # move the policy off the reference (a frozen copy), so both log-ratios are non-zero
        g = torch.Generator().manual_seed(0)
        for p in state.params:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    obj = make_objective(cfg.train, cfg.sample)
    h, w = traj.latents.shape[-2:]
    data = EpochData(traj, torch.ones(4, h, w), "cpu")
    ctx = ChunkContext(state.accelerator, state.policy, data, policy_net := state.policy.denoiser(state.unet),
                       state.policy.denoiser(state.unet), state.params, state.reference, seed=5, offset=0)
    del policy_net
    return cfg, state, traj, obj, ctx


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_same_gradients(g_out, g_want):
    """Equal up to float summation order (one batch of 2K here, two of K there): 1e-4 of each tensor's scale."""
    assert sum(float(g.abs().sum()) for g in g_want if g is not None) > 0
    for x, y in zip(g_out, g_want):
        if y is not None:
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4 * float(y.abs().max()) + 1e-12)


def test_d3po_objective_with_a_plus_one_map_is_d3po_on_the_real_unet(tmp_path, tiny_model_dir):
    cfg, state, traj, obj, ctx = _objective_setup(tmp_path, tiny_model_dir, "d3po")
    s, j = torch.tensor([0, 1]), torch.tensor([2, 0])
    out = obj.chunk(ctx, s, j)

    # D3PO, whole image, written here: DDPO's mean-reduced log-probs of A (2p) and B (2p+1), policy and reference
    pol, beta, ref_net = state.policy, cfg.train.preference_beta, state.reference.frozen

    def lp(net, idx, step):
        x_t, x_prev = traj.latents[idx, step], traj.latents[idx, step + 1]
        o = pol.log_prob(pol.denoiser(net), x_t, step, x_prev, traj.cond(idx), traj.uncond())
        return o.log_prob.mean(dim=(1, 2, 3))

    a, b = 2 * s, 2 * s + 1
    with torch.no_grad():
        ref_a, ref_b = lp(ref_net, a, j), lp(ref_net, b, j)
    want = -F.logsigmoid(beta * ((lp(state.unet, a, j) - ref_a) - (lp(state.unet, b, j) - ref_b))).mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-7)
    _assert_same_gradients(_grads(out.loss, state.params), _grads(want, state.params))
    assert out.ratio is not None and 0.0 <= float(out.diagnostics[0]) <= 1.0


def test_diffusion_dpo_objective_with_a_plus_one_map_is_diffusion_dpo_on_the_real_unet(tmp_path, tiny_model_dir):
    cfg, state, traj, obj, ctx = _objective_setup(tmp_path, tiny_model_dir, "diffusion_dpo")
    s, j = torch.tensor([0, 1]), torch.tensor([1, 2])
    out = obj.chunk(ctx, s, j)

    # Diffusion-DPO's training step, written here: one timestep and noise per pair, winners = A, losers = B
    from pxpo.training.chunks import item_noise

    pol, sched = state.policy, state.policy.scheduler
    x0 = torch.cat([traj.latents[2 * s, -1], traj.latents[2 * s + 1, -1]])
    noise = item_noise(5, 0, s, j, tuple(x0.shape[1:]))
    noise = torch.cat([noise, noise])
    t = pol.timesteps[torch.cat([j, j])]
    x_t = sched.add_noise(x0, noise, t)  # diffusers' forward process, epsilon target
    cond = traj.cond(torch.cat([2 * s, 2 * s + 1]))

    def pred(net):
        return net(x_t, t, encoder_hidden_states=cond.embeds).sample

    with torch.no_grad():
        ref = pred(state.reference.frozen)
    model = pred(state.unet)
    beta_dpo = 2 * cfg.train.dpo_beta * sched.config.num_train_timesteps  # the code's beta_dpo: beta_eff = 0.5 beta_dpo
    mw, ml = (model - noise).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    rw, rl = (ref - noise).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    want = -F.logsigmoid(-0.5 * beta_dpo * ((mw - ml) - (rw - rl))).mean()
    # float32 cancellation: beta T = 2500 times differences of MSEs near 1 summed in another order (a wrong
    # normalisation or factor would be off by 2x or more)
    torch.testing.assert_close(out.loss, want, rtol=2e-3, atol=1e-6)
    _assert_same_gradients(_grads(out.loss, state.params), _grads(want, state.params))


@pytest.mark.parametrize("algorithm,extra", [("d3po", []), ("diffusion_dpo", []), ("d3po", ["train.preference_map=whole", "sample.sampler=lcm", "train.probe_every=1", "train.probe_samples=3"])])
def test_pxpo_run_trains_from_model_made_preference_maps(tmp_path, tiny_model_dir, tiny_lcm_model_dir, algorithm, extra):
    model = tiny_lcm_model_dir if "sample.sampler=lcm" in extra else tiny_model_dir
    extra = [*extra, *(["sample.num_steps=2"] if "sample.sampler=lcm" in extra else [])]
    cfg = _cfg(model, tmp_path / "r", "train.epochs=2", f"train.algorithm={algorithm}", *extra)
    run(cfg, JsonlTracker(tmp_path / "r"), progress=False)
    hist = _history(tmp_path / "r")
    assert {"pref_accuracy", "pref_margin", "loss", "reward_mean"} <= set(hist[0]) and "kl_ref" not in hist[0]
    assert hist[0]["optimizer_steps"] == 2  # 4 samples = 2 pairs, 1 pair per micro-batch
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[1]["pref_margin"] != 0.0  # the policy has moved off its reference
    assert 0.0 <= hist[1]["pref_accuracy"] <= 1.0
    assert (tmp_path / "r" / "lora").is_dir()


@pytest.mark.parametrize("algorithm", ["diffusion_dpo", "d3po"])
def test_both_objectives_train_a_flow_model(tmp_path, tiny_sd3_dir, algorithm):
    """SD3-class flow models: Diffusion-DPO on the velocity target, D3PO on the flow SDE's log-ratios."""
    cfg = _cfg(tiny_sd3_dir, tmp_path / "f", "sample.sampler=flow_sde", "train.epochs=2", f"train.algorithm={algorithm}")
    run(cfg, JsonlTracker(tmp_path / "f"), progress=False)
    hist = _history(tmp_path / "f")
    assert hist[0]["optimizer_steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[1]["pref_margin"] != 0.0
