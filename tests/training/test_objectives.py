"""The objective protocol: the registry, and DiffusionNFT's sampling policy (on-policy, or soft-updated)."""

from types import SimpleNamespace

import pytest
import torch

from pxpo.config import load_config
from pxpo.training.objectives import NFT, PolicyGradient, make_objective, objective_class


def _train(**kw):
    return load_config(None, ["sample.sampler=flow_sde", *(f"train.{k}={v}" for k, v in kw.items())]).train


@pytest.mark.parametrize("algorithm,cls,per_sample", [("pxpo", PolicyGradient, False), ("ddpo", PolicyGradient, True),
                                                        ("nft", NFT, False), ("nft_scalar", NFT, True)])
def test_the_registry_builds_each_algorithm(algorithm, cls, per_sample):
    obj = make_objective(_train(algorithm=algorithm))
    assert type(obj) is cls and obj.per_sample is per_sample and objective_class(algorithm) == (cls, per_sample)
    assert obj.has_ratio is (cls is PolicyGradient) and obj.forward_process is (cls is NFT)


def test_nft_on_policy_by_default_and_soft_updated_with_a_rate():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2))]
    ctx = SimpleNamespace(params=params)

    on = make_objective(_train(algorithm="nft"))
    on.begin_epoch(ctx)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    on.end_epoch(ctx, 10)
    with on.sampling(params):  # on-policy: the rollouts use the current weights
        assert torch.equal(params[0], torch.ones(3))
    on.begin_epoch(ctx)
    assert torch.equal(on.old[0], torch.ones(3)) and not on.stateful  # the old policy is the current one again

    soft = make_objective(_train(algorithm="nft", nft_old_decay_rate=0.1, nft_old_decay_max=0.5))
    assert soft.stateful and soft.decay(3) == pytest.approx(0.3) and soft.decay(100) == 0.5
    soft.begin_epoch(ctx)  # old = current = (1, 1, 1), (2, 2)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # current = (2, 2, 2), (3, 3)
    soft.end_epoch(ctx, 3)  # d = 0.3: old = 0.3 old + 0.7 current
    torch.testing.assert_close(soft.old[0], torch.full((3,), 1.7))
    torch.testing.assert_close(soft.old[1], torch.full((2,), 2.7))
    with soft.sampling(params):  # the rollouts run with the old weights, then the current ones come back
        torch.testing.assert_close(params[0].detach(), torch.full((3,), 1.7))
    assert torch.equal(params[0].detach(), torch.full((3,), 2.0))
    soft.begin_epoch(ctx)  # a soft-updated old policy is kept across epochs
    torch.testing.assert_close(soft.old[0], torch.full((3,), 1.7))

    restored = make_objective(_train(algorithm="nft", nft_old_decay_rate=0.1))
    restored.load_state_dict(soft.state_dict())  # what a checkpoint keeps
    restored.begin_epoch(ctx)
    torch.testing.assert_close(restored.old[1], torch.full((2,), 2.7))
