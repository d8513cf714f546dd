"""Objectives: from an epoch's reward maps to the loss of one chunk of (sample, transition) pairs.

The objective protocol sits beside the policy protocol (:mod:`pxpo.core.policy`):
the step runner (:class:`pxpo.training.step.StepRunner`) holds ONE objective and
never asks which it is. An objective says

``per_sample``: whether its advantages are one scalar per sample (DDPO, scalar
    NFT: each map's mean) or a map on the latent grid (PXPO, pixel-wise NFT);
``has_ratio``: whether it re-scores the sampler's log-probs (an importance
    ratio the health check :class:`pxpo.training.guardrails.RatioHealth` must find
    at 1 on an epoch's first update); an objective without one reports no ratio
    figure and logs its own signal instead;
``forward_process``: whether it trains on the forward process of a flow model
    (DiffusionNFT) instead of the sampler's stored transitions;
``names``: the detached diagnostics its :meth:`~Objective.chunk` returns, in order;
``steps(policy)``: the transition (or noise-level) indices j its pairs draw from;
``begin_epoch(ctx)`` / ``end_epoch(ctx, optimizer_steps)``: called around an
    epoch's updates (``optimizer_steps``: the run's steps so far);
``sampling(params)``: a context the rollouts run in (NFT: the sampling policy's weights);
``chunk(ctx, s, j)``: the chunk's :class:`ChunkLoss`;
``state_dict()`` / ``load_state_dict()``: what a checkpoint keeps of it.

``pairs``: whether it trains on aligned pairs (issue 24): its units are pairs p of samples
    (2p = A, 2p + 1 = B), ``chunk`` gets pair indices in ``s``, and its advantages are the
    pairs' preference maps on the latent grid, from its ``advantages`` method (the others' come
    from the loop's stat tracker);

Implementations: :class:`PolicyGradient` (``pxpo``, ``ddpo``; PPO-clipped or
score-function by ``train.loss``), :class:`NFT` (``nft``, ``nft_scalar``),
:class:`RegionD3PO` (``d3po``) and :class:`RegionDiffusionDPO` (``diffusion_dpo``).
The one registry of ``train.algorithm`` is :data:`pxpo.config.algorithms.ALGORITHMS`
(what each algorithm is); :data:`OBJECTIVE_KINDS` maps its rows to these classes and
:func:`make_objective` builds one.
"""

from __future__ import annotations

import contextlib

import torch

from ..core.losses import DIAGNOSTICS as PG_DIAGNOSTICS, ddpo_loss, pxpo_loss
from ..core.nft import forward_noise, nft_loss, optimality, velocity_kl
from ..config.algorithms import algorithm
from .chunks import ChunkContext, ChunkLoss, Objective, item_noise
from .preference import RegionD3PO, RegionDiffusionDPO, _Preference

__all__ = ["ChunkContext", "ChunkLoss", "Objective", "PolicyGradient", "NFT", "RegionD3PO", "RegionDiffusionDPO", "make_objective", "objective_class"]

NFT_KL_NOISE_LEVEL = 0.7  # the SDE the NFT KL is calibrated on when the rollouts are ODE (sample.noise_level 0): Flow-GRPO's a


class PolicyGradient:
    """PXPO (per-element advantages) or DDPO (per-sample scalars) on re-scored sampler log-probs.

    ``train.loss``: ``ppo`` (clipped ratio) or ``sf`` (score function); the per-element
    clip rule, ratio mode and log-ratio cap are ``train``'s (:mod:`pxpo.core.losses`).
    The KL to the reference is the Gaussian step KL on the same stored x_t (:mod:`pxpo.core.kl`).
    """

    has_ratio, forward_process, stateful, pairs = True, False, False, False
    names = PG_DIAGNOSTICS

    def __init__(self, train_cfg, per_sample: bool):
        self.t, self.per_sample = train_cfg, per_sample

    def steps(self, policy) -> torch.Tensor:
        return policy.trained_steps  # LCM: not the last re-noising; a windowed SDE: the window

    def begin_epoch(self, ctx: ChunkContext) -> None:
        pass

    def end_epoch(self, ctx: ChunkContext, optimizer_steps: int) -> None:
        pass

    def sampling(self, params):
        return contextlib.nullcontext()  # on-policy: the rollouts are the current weights'

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def chunk(self, ctx: ChunkContext, s: torch.Tensor, j: torch.Tensor) -> ChunkLoss:
        d, t = ctx.data, self.t
        x_t, x_prev, lp_old, cond, adv = d.pairs(s, j)
        j = j.to(d.device)
        with ctx.accelerator.autocast():
            out = ctx.policy.log_prob(ctx.denoiser, x_t, j, x_prev, cond, d.uncond)
        kw = dict(mode=t.loss, clip_range=t.clip_range, adv_clip_max=t.adv_clip_max, max_log_ratio=t.max_log_ratio)
        res = ddpo_loss(out.log_prob, lp_old, adv, **kw) if self.per_sample else pxpo_loss(out.log_prob, lp_old, adv, ratio=t.ratio, **kw)
        kl = None
        if ctx.reference is not None:
            kl = ctx.reference.kl(ctx.policy, out, x_t, j, x_prev, cond, d.uncond, ctx.accelerator.autocast)
        return ChunkLoss(res.loss, list(res.diagnostics().values()), kl, (out.log_prob, lp_old))


class NFT:
    """DiffusionNFT (arXiv 2509.16117, :mod:`pxpo.core.nft`): a forward-process loss on the epoch's clean samples.

    Each pair (sample s, level j) takes the sample's clean latent x_0 (the
    trajectory's last latent), t = sigmas[j] of the sampling schedule and fresh
    noise eps, forms x_t = (1 - t) x_0 + t eps and fits the conditional velocity
    there (CFG-free: no guidance at training time). v_old is the sampling policy's
    velocity: the trainable weights ``old`` swapped in for one no-grad forward of
    the unwrapped network per chunk. By default (``train.nft_old_decay_rate`` 0)
    ``old`` is the current weights at the start of each epoch (on-policy). With a
    rate > 0 it is DiffusionNFT's soft-updated policy: after each epoch
    old <- d old + (1 - d) current, d = min(rate x optimizer steps, ``nft_old_decay_max``),
    and the online loop samples with ``old`` (:meth:`sampling`); it is kept in
    checkpoints (:meth:`state_dict`). The noise of pair (s, j)
    is a function of (run seed, epoch, global sample index, j) only, so any number
    of processes and any chunking give the same points.

    KL (``train.kl_coef``): the per-element velocity KL of :func:`pxpo.core.nft.velocity_kl`
    against the reference's velocity on the same x_t, calibrated on the flow SDE at
    ``sample.noise_level`` (Flow-GRPO's 0.7 when the rollouts are ODE), so kl_coef
    means what it means for Flow-GRPO. No importance ratio: the health signal is
    ``nft_old_deviation``, the mean squared distance of the velocity from the old one.
    """

    has_ratio, forward_process, pairs = False, True, False
    names = ("nft_positive", "nft_negative", "nft_old_deviation")

    def __init__(self, train_cfg, per_sample: bool, noise_level: float | None = None):
        self.t, self.per_sample = train_cfg, per_sample
        self.kl_noise_level = noise_level if noise_level else NFT_KL_NOISE_LEVEL
        self.decay_rate, self.decay_max = train_cfg.nft_old_decay_rate, train_cfg.nft_old_decay_max
        self.old: list[torch.Tensor] = []  # the sampling policy's values of the trainable parameters

    def steps(self, policy) -> torch.Tensor:
        return torch.arange(len(policy.timesteps))  # every level of the schedule

    @property
    def stateful(self) -> bool:
        """Whether a checkpoint must keep :meth:`state_dict` (a soft-updated sampling policy)."""
        return self.decay_rate > 0

    def _place(self, params) -> None:
        """Moves ``old`` (e.g. loaded from a checkpoint on CPU) to the parameters' devices and dtypes."""
        self.old = [o.to(p.device, p.dtype) for o, p in zip(self.old, params)]

    def begin_epoch(self, ctx: ChunkContext) -> None:
        if not self.old or self.decay_rate == 0:  # on-policy (or the run's first epoch): the current weights
            self.old = [p.detach().clone() for p in ctx.params]
        self._place(ctx.params)

    def decay(self, optimizer_steps: int) -> float:
        """d of the soft update after ``optimizer_steps`` steps: min(rate x steps, max)."""
        return min(self.decay_rate * optimizer_steps, self.decay_max)

    @torch.no_grad()
    def end_epoch(self, ctx: ChunkContext, optimizer_steps: int) -> None:
        if self.decay_rate == 0:
            return
        d = self.decay(optimizer_steps)
        for o, p in zip(self.old, ctx.params):
            o.mul_(d).add_(p.detach().to(o.dtype), alpha=1 - d)

    def sampling(self, params):
        """The rollouts run with the sampling policy's weights (only with a soft-updated old policy)."""
        if self.decay_rate == 0 or not self.old:
            return contextlib.nullcontext()
        self._place(params)
        return self._old_weights(params)

    def state_dict(self) -> dict:
        return {"old": [o.detach().cpu() for o in self.old]}

    def load_state_dict(self, state: dict) -> None:
        self.old = [o.clone() for o in state.get("old", [])]

    @contextlib.contextmanager
    def _old_weights(self, params):
        """The trainable parameters hold the sampling policy's values inside the block (no copies made)."""
        with torch.no_grad():
            for p, o in zip(params, self.old):
                p.data, o.data = o.data, p.data
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(params, self.old):
                    p.data, o.data = o.data, p.data

    @staticmethod
    def _noise(ctx: ChunkContext, s: torch.Tensor, j: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return item_noise(ctx.seed, ctx.offset, s, j, shape)

    def chunk(self, ctx: ChunkContext, s: torch.Tensor, j: torch.Tensor) -> ChunkLoss:
        d, pol, acc = ctx.data, ctx.policy, ctx.accelerator
        dev = d.device
        s_, j_ = s.to(d.latents.device), j.to(dev)
        x0 = d.latents[s_, -1].to(dev).float()
        cond = d.cond.index(s_).to(dev)
        r = optimality(d.advantages[s_].to(dev).float(), self.t.adv_clip_max)
        sigma = pol.sigmas.to(dev)[j_]
        x_t = forward_noise(x0, sigma, self._noise(ctx, s, j, tuple(x0.shape[1:])).to(dev))
        t_net = sigma * pol.timestep_scale
        with torch.no_grad(), acc.autocast(), self._old_weights(ctx.params):
            v_old = ctx.plain(x_t, t_net, cond)
        with acc.autocast():
            v = ctx.denoiser(x_t, t_net, cond)
        res = nft_loss(v, v_old, x_t, x0, sigma, r, beta=self.t.nft_beta, loss_scale=self.t.adv_clip_max)
        kl = None
        if ctx.reference is not None:
            with torch.no_grad(), acc.autocast(), ctx.reference.network() as net:
                v_ref = pol.denoiser(net)(x_t, t_net, cond)
            kl = velocity_kl(v, v_ref, pol.sigmas, j_, self.kl_noise_level)
        return ChunkLoss(res.loss, [res.positive, res.negative, res.old_deviation], kl, None)


# The objective kinds of pxpo.config.algorithms' rows (the registry of train.algorithm).
OBJECTIVE_KINDS: dict[str, type] = {"policy_gradient": PolicyGradient, "nft": NFT, "d3po": RegionD3PO, "diffusion_dpo": RegionDiffusionDPO}


def objective_class(name: str) -> tuple[type, bool]:
    """(class, per_sample) of ``train.algorithm: <name>``."""
    row = algorithm(name)
    return OBJECTIVE_KINDS[row.objective], row.per_sample


def make_objective(train_cfg, sample_cfg=None) -> Objective:
    """The objective of ``train_cfg.algorithm`` (``sample_cfg``: the sampler's noise level for NFT's KL)."""
    cls, per_sample = objective_class(train_cfg.algorithm)
    if cls is NFT:
        return NFT(train_cfg, per_sample, getattr(sample_cfg, "noise_level", None))
    if issubclass(cls, _Preference):
        return cls(train_cfg)
    return cls(train_cfg, per_sample)
