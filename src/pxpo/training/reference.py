"""The reference policy of the KL penalty (``train.kl_coef``) and its per-element KL.

The reference is the base model the run started from, sampled by the same
policy (sampler, schedule, guidance), so its transition from the stored
``x_t`` is a Gaussian with the same std and the KL per element is
``(mu_theta - mu_ref)^2 / (2 std^2)`` (:mod:`pxpo.core.kl`):

* with LoRA, the reference is the SAME network with its adapters disabled
  (diffusers' ``disable_adapters`` / ``enable_adapters``, a flag on the peft
  layers): no second copy of the weights, one extra forward per chunk;
* with full fine-tuning, a frozen copy of the network taken before any
  checkpoint or stage state is loaded (so it is the base model on a fresh,
  resumed or continued run alike), in eval mode, without gradients.

:class:`Reference` is built with the optimisation state
(:func:`pxpo.training.state.build_train_state`, ``TrainState.reference``) and passed
to the step runner; :meth:`Reference.kl` is the policy-gradient objective's KL
(:class:`pxpo.training.objectives.PolicyGradient`); DiffusionNFT takes the reference's
velocity from :meth:`Reference.network` (:class:`pxpo.training.objectives.NFT`).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..core.policy import base_network, gaussian_kl


class Reference:
    """The base model's transitions for the KL penalty.

    Args:
        net: the network being trained (unwrapped: no DDP / compile wrapper).
        lora: True: the reference is ``net`` with adapters disabled; False:
            ``frozen`` is a frozen copy of the base network.
    """

    def __init__(self, net, lora: bool, frozen=None):
        self.net, self.lora, self.frozen = net, lora, frozen

    @classmethod
    def build(cls, accelerator, unet, train_cfg) -> Reference | None:
        """The run's reference, or None when ``train.kl_coef`` is 0 (and the algorithm is not a preference one,
        whose loss is written against the reference). Call before any state is loaded.

        ``unet``: the trained network as prepared by ``accelerator`` (DDP-wrapped or not).
        """
        from ..config.algorithms import algorithm

        if train_cfg.kl_coef <= 0 and not algorithm(train_cfg.algorithm).pairs:  # the preference objectives' log-ratios need it
            return None
        net = base_network(accelerator.unwrap_model(unet))
        if train_cfg.use_lora:
            return cls(net, True)
        frozen = copy.deepcopy(net).eval().requires_grad_(False)
        return cls(net, False, frozen)

    def modules(self) -> list[torch.nn.Module]:
        """Networks this reference holds besides the trained one (none with LoRA)."""
        return [self.frozen] if self.frozen is not None else []

    @contextlib.contextmanager
    def network(self):
        """The reference network for the duration of the block (LoRA: adapters disabled, then enabled again)."""
        if not self.lora:
            yield self.frozen
            return
        self.net.disable_adapters()
        try:
            yield self.net
        finally:
            self.net.enable_adapters()

    def kl(self, policy, out, x_t, step_index, x_prev, cond, uncond, autocast=contextlib.nullcontext) -> torch.Tensor:
        """Per-element KL(policy || reference) of the transitions (B, C, h, w); gradients through ``out.mean``.

        ``out``: the policy's :class:`~pxpo.core.policy.StepOutput` of the same
        transitions (``x_t`` (B, ...), ``step_index`` (B,), ``x_prev``); ``autocast``:
        the context the policy's pass ran under (the same precision for both).
        """
        with torch.no_grad(), self.network() as net, autocast():
            ref = policy.log_prob(policy.denoiser(net), x_t, step_index, x_prev, cond, uncond)
        # one policy on the same (x_t, step): the std is the schedule's, so the equal-std form (no host-side std comparison)
        return gaussian_kl(out, ref)


def parameter_bytes(*modules) -> int:
    """Bytes of the distinct parameter storages of ``modules`` (a weight shared by two counts once)."""
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total
