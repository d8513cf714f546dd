"""The policy protocol (pxpo.core.policy): Cond, the network adapter, the registry, and the contract
every policy keeps (stored log-probs recomputed at mixed step indices, per-sample seeds)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import LCMScheduler

from pxpo.core.policies import make_policy, policy_class
from pxpo.core.policy import Cond, Denoiser, Policy, Rollout, StepOutput, gaussian_kl
from pxpo.core.sampling import encode_cond
from pxpo.errors import PxpoInputError


def _cfg(sampler, num_steps=4, eta=1.0, guidance_scale=3.0):
    return SimpleNamespace(sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)


def test_cond_helpers():
    c = Cond(torch.randn(3, 5, 8), torch.randn(3, 4), torch.randn(3, 6))
    assert len(c) == 3 and c.index([2, 0]).pooled.shape == (2, 4)
    torch.testing.assert_close(c.index(torch.tensor([1])).time_ids, c.time_ids[1:2])
    one = Cond(torch.randn(1, 5, 8))
    assert one.expand(3).embeds.shape == (3, 5, 8) and one.expand(3).pooled is None
    both = Cond.cat([c.index(slice(0, 1)), c.index(slice(1, 3))])
    assert torch.equal(both.embeds, c.embeds) and torch.equal(both.time_ids, c.time_ids)
    assert c.to(dtype=torch.float16).pooled.dtype == torch.float16


class _Recorder(torch.nn.Module):
    """A fake network: output = x * (1 + mean of the embeddings); records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.config = SimpleNamespace()

    def forward(self, x, t, encoder_hidden_states, **kw):
        self.calls.append((x.shape[0], sorted(kw), kw.get("added_cond_kwargs")))
        return SimpleNamespace(sample=x * (1 + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)))


def test_denoiser_guidance_is_one_call_and_equals_two_passes():
    net = _Recorder()
    x, cond, neg = torch.randn(3, 2, 4, 4), Cond(torch.randn(3, 5, 8)), Cond(torch.randn(1, 5, 8))
    out = Denoiser(net)(x, 7, cond, neg, 4.0)
    assert [c[0] for c in net.calls] == [6]
    u, c = Denoiser(net)(x, 7, neg.expand(3)), Denoiser(net)(x, 7, cond)
    torch.testing.assert_close(out, u + 4.0 * (c - u))
    net.calls.clear()
    Denoiser(net)(x, 7, cond, neg, 1.0)  # w <= 1: one conditional pass
    assert [c[0] for c in net.calls] == [3]


def test_denoiser_passes_sdxl_added_conditioning():
    net = _Recorder()
    cond = Cond(torch.randn(2, 5, 8), torch.randn(2, 4), torch.randn(2, 6))
    neg = Cond(torch.zeros(1, 5, 8), torch.zeros(1, 4), torch.randn(1, 6))
    Denoiser(net)(torch.randn(2, 2, 4, 4), 3, cond, neg, 2.0)
    rows, keys, added = net.calls[0]
    assert rows == 4 and keys == ["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], torch.cat([neg.pooled.expand(2, 4), cond.pooled]))
    assert torch.equal(added["time_ids"], torch.cat([neg.time_ids.expand(2, 6), cond.time_ids]))
    net.calls.clear()
    Denoiser(net)(torch.randn(2, 2, 4, 4), 3, Cond(cond.embeds), None)  # SD: no added kwargs at all
    assert net.calls[0][1] == []


def test_registry_and_protocol(tiny_pipe):
    ddim = make_policy(_cfg("ddim"), copy.deepcopy(tiny_pipe.scheduler))
    lcm = make_policy(_cfg("lcm"), LCMScheduler.from_config(tiny_pipe.scheduler.config))
    for p in (ddim, lcm):
        assert isinstance(p, Policy) and p.timesteps.dtype == torch.int64 and p.timesteps.shape == (4,)
    assert ddim.trained_steps.tolist() == [0, 1, 2, 3] and lcm.trained_steps.tolist() == [0, 1, 2]
    assert policy_class("ddim").scheduler_class == "DDIMScheduler" and policy_class("lcm").scheduler_class == "LCMScheduler"
    with pytest.raises(PxpoInputError, match="sample.sampler"):
        make_policy(_cfg("nope"), tiny_pipe.scheduler)
    one_step = make_policy(_cfg("lcm", num_steps=1), LCMScheduler.from_config(tiny_pipe.scheduler.config))
    with pytest.raises(PxpoInputError, match="sample.num_steps"):
        one_step.trained_steps  # sampling one step is fine; training it is refused
    with pytest.raises(PxpoInputError, match="sample.eta"):
        make_policy(_cfg("ddim", eta=0.0), tiny_pipe.scheduler)


def test_gaussian_kl_is_the_normal_kl_per_element():
    std = torch.full((2, 1, 1, 1), 0.3)
    p = StepOutput(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4), std)
    q = StepOutput(p.prev_sample, p.log_prob, torch.randn(2, 3, 4, 4), std)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(p.mean, std.expand_as(p.mean)), torch.distributions.Normal(q.mean, std.expand_as(q.mean)))
    torch.testing.assert_close(gaussian_kl(p, q), ref)
    assert gaussian_kl(p, p).abs().max() == 0


def test_rollout_final_defaults_to_the_last_latent():
    r = Rollout(torch.randn(2, 4, 3, 2, 2), torch.randn(2, 3, 3, 2, 2), torch.arange(3))
    assert torch.equal(r.final, r.latents[:, -1])


@pytest.fixture(scope="module")
def nets(tiny_pipe):
    from diffusers import UNet2DConditionModel

    unet = copy.deepcopy(tiny_pipe.unet)
    w = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=16)
    w.load_state_dict(unet.state_dict(), strict=False)
    with torch.no_grad():
        torch.manual_seed(0)
        for m in (unet, w):
            for p in m.conv_out.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return {"ddim": unet, "lcm": w}


SCHEDULERS = {"ddim": lambda pipe: copy.deepcopy(pipe.scheduler), "lcm": lambda pipe: LCMScheduler.from_config(pipe.scheduler.config)}


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_policy_contract(tiny_pipe, nets, sampler):
    """Every policy: shapes; stored log-probs recomputed at MIXED step indices; a sample is the same in any batch."""
    policy = make_policy(_cfg(sampler), SCHEDULERS[sampler](tiny_pipe))
    den = policy.denoiser(nets[sampler])
    with torch.no_grad():
        cond = encode_cond(tiny_pipe, ["a handwritten digit 1", "a handwritten digit 2", "a handwritten digit 3"])
        neg = encode_cond(tiny_pipe, [""], negative=True)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    r = policy.sample(den, cond, neg, (4, 8, 8), gens)
    assert r.latents.shape == (3, 5, 4, 8, 8) and r.log_probs.shape == (3, 4, 4, 8, 8) and r.final.shape == (3, 4, 8, 8)
    assert torch.equal(r.timesteps, policy.timesteps)
    j = policy.trained_steps[torch.tensor([2, 0, 1]) % len(policy.trained_steps)]
    idx = torch.arange(3)
    with torch.no_grad():
        out = policy.log_prob(den, r.latents[idx, j], j, r.latents[idx, j + 1], cond, neg)
    torch.testing.assert_close(out.log_prob, r.log_probs[idx, j], rtol=1e-5, atol=1e-3)
    assert (out.std > 0).all()
    alone = policy.sample(den, cond.index(slice(1, 2)), neg, (4, 8, 8), [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(alone.latents[0], r.latents[1], rtol=1e-3, atol=1e-3)
