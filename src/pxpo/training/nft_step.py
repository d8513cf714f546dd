"""DiffusionNFT's training pass (``train.algorithm: nft`` / ``nft_scalar``): a forward-process loss.

Where the policy-gradient pass (:class:`pxpo.training.step.StepRunner`) re-scores
stored transitions, DiffusionNFT (arXiv 2509.16117, :mod:`pxpo.core.nft`) takes
each sample's clean latent x_0 (the trajectory's last latent), a noise level
t_j of the sampling schedule and fresh noise eps, forms x_t = (1 - t) x_0 + t eps
and fits the velocity there: no sampler log-probs, and no classifier-free
guidance (the conditional velocity is trained; DiffusionNFT is CFG-free).

The pairs (sample s, level j) and the optimizer steps are the policy-gradient
pass's (:meth:`StepRunner.step`: chunks, gradient scaling, clipping, guard);
only the chunk's loss differs. v_old, the sampling policy's velocity, comes
from the trainable weights as they were when the epoch's training began (a
copy of ``state.params``, swapped in for one no-grad forward per chunk): the
weights the epoch's samples were drawn with. The noise of pair (s, j) is a
function of (run seed, epoch, global sample index, j) only, so any number of
processes and any chunking give the same points.
"""

from __future__ import annotations

import contextlib

import torch

from ..core.nft import forward_noise, nft_loss, optimality
from ..core.policy import batch_randn
from .step import StepRunner


class NFTStepRunner(StepRunner):
    """:class:`StepRunner` with DiffusionNFT's loss; the policy is a flow policy (``sigmas``, ``timestep_scale``).

    Extra args: seed (run seed and epoch folded in by the caller), offset (this
    process's first global sample index).
    """

    names = ("loss", "nft_positive", "nft_negative", "nft_old_deviation")

    def __init__(self, state, policy, data, t, compute, guard, where: str, *, seed: int = 0, offset: int = 0):
        super().__init__(state, policy, data, t, compute, guard, where)
        self.reference = self.health = None  # the KL penalty and the ratio check are the policy-gradient pass's
        self.seed, self.offset = seed, offset
        self.old = [p.detach().clone() for p in state.params]  # the sampling policy's weights

    @contextlib.contextmanager
    def _old_weights(self):
        """The trainable parameters hold the sampling policy's values inside the block (no copies made)."""
        params = self.state.params
        with torch.no_grad():
            for p, o in zip(params, self.old):
                p.data, o.data = o.data, p.data
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(params, self.old):
                    p.data, o.data = o.data, p.data

    def _noise(self, s: torch.Tensor, j: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed((self.seed * 1_000_003 + self.offset + int(a)) * 1_009 + int(b)) for a, b in zip(s, j)]
        return batch_randn((len(s), *shape), gens)

    def _chunk(self, s, j, weight: float, last: bool, step_sums, finite):
        acc, d, pol = self.state.accelerator, self.data, self.policy
        dev = d.device
        s_ = s.to(d.latents.device)
        x0 = d.latents[s_, -1].to(dev).float()
        cond = d.cond.index(s_).to(dev)
        r = optimality(d.advantages[s_].to(dev).float(), self.t.adv_clip_max)
        sigma = pol.sigmas.to(dev)[j.to(dev)]
        x_t = forward_noise(x0, sigma, self._noise(s, j, tuple(x0.shape[1:])).to(dev))
        t_net = sigma * pol.timestep_scale
        k = len(s)
        with acc.autocast():
            with self._old_weights():
                v_old = self.denoiser(x_t, t_net, cond).detach()
        sync = acc.no_sync(self.state.unet) if not last else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                v = self.denoiser(x_t, t_net, cond)
            res = nft_loss(v, v_old, x_t, x0, sigma, r, beta=self.t.nft_beta, loss_scale=self.t.adv_clip_max)
            self._backward(res.loss, k, weight)
        self._record([res.loss, res.positive, res.negative, res.old_deviation], k, step_sums, finite)
        return k
