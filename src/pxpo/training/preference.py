"""The region-level preference objectives (issue 24): region-level D3PO and Diffusion-DPO on aligned pairs.

The maths is pure (:mod:`pxpo.core.preference`); this module feeds it the policy's log-probs (D3PO)
or the network's predictions on the forward process (Diffusion-DPO), of the current weights and
of the reference (:mod:`pxpo.training.reference`), through the objective protocol
(:mod:`pxpo.training.objectives`). Both are registered in :data:`pxpo.config.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

import contextlib

import torch

from ..core.advantages import to_latent_grid
from ..core.policy import gaussian_kl
from ..core.preference import preference_from_maps, region_d3po_loss, region_dpo_loss
from .chunks import ChunkContext, ChunkLoss, item_noise


class _Preference:
    """What the two preference objectives share: pairs as units, preference maps as advantages, the reference.

    ``advantages(maps, latent_hw, scale)``: the epoch's per-sample maps (N, H, W) -> (N, h, w),
    rows 2p and 2p + 1 both pair p's preference map on the latent grid (area-averaged,
    :func:`pxpo.core.preference.pool_preferences`). ``maps`` are the labeller's reward maps
    (online: m = clip((map_A - map_B) * scale, -1, 1)), or, with ``preferences`` given, the
    label stage's maps already expanded to samples (:func:`pxpo.core.preference.expand_to_samples`).
    ``train.preference_map: whole`` replaces each map by sign(mean m), constant (one preference per pair).

    The reference (``ctx.reference``, the LoRA-off network or a frozen copy) is always built for
    these objectives (:meth:`pxpo.training.reference.Reference.build`); ``train.kl_coef`` > 0 adds
    the KL penalty on top as for the other objectives.
    """

    per_sample, stateful, pairs = False, False, True
    names = ("pref_accuracy", "pref_margin")

    def __init__(self, train_cfg):
        self.t = train_cfg

    def begin_epoch(self, ctx: ChunkContext) -> None:
        if ctx.reference is None:
            raise RuntimeError("a preference objective needs its reference (Reference.build builds one for it)")

    def end_epoch(self, ctx: ChunkContext, optimizer_steps: int) -> None:
        pass

    def sampling(self, params):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def preferences(self, maps: torch.Tensor, scale: float) -> torch.Tensor:
        """Reward maps (N, H, W) of aligned pairs -> per-sample preference maps (N, H, W) (both rows of a pair: its m)."""
        m = preference_from_maps(maps[0::2], maps[1::2], scale)
        return m.repeat_interleave(2, 0)

    def advantages(self, maps: torch.Tensor, latent_hw: tuple[int, int], scale: float, preferences: torch.Tensor | None = None) -> torch.Tensor:
        """(N, h, w) pooled preference maps per sample (class docstring)."""
        rows = preferences if preferences is not None else self.preferences(maps, scale)
        if self.t.preference_map == "whole":
            rows = torch.sign(rows.float().mean((1, 2)))[:, None, None].expand_as(rows)
        return to_latent_grid(rows.float(), latent_hw)

    @staticmethod
    def _sides(s: torch.Tensor) -> torch.Tensor:
        """Pair indices (K,) -> their samples (2K,): the K A's, then the K B's."""
        return torch.cat([2 * s, 2 * s + 1])

    def _diagnostics(self, res) -> list[torch.Tensor]:
        acc = torch.nan_to_num(res.accuracy, nan=0.5)  # a chunk of unlabelled pairs: chance
        return [acc, res.margin.mean()]


class RegionD3PO(_Preference):
    """Region-level D3PO (``d3po``) on the sampler's aligned pairs, :func:`pxpo.core.preference.region_d3po_loss`.

    Each item (pair p, step j) re-scores both stored transitions x^X_j -> x^X_{j+1}, X in {A, B},
    under the current weights and the reference (same sampler, same guidance) in one batch of
    2K, d_X = log pi_theta - log pi_ref per element, L = -log sigmoid(beta mean_e m_e (d_A,e - d_B,e))
    with m the pair's preference map on the latent grid broadcast over channels. Any sampler
    (DDIM, LCM, flow SDE): only the policy's ``log_prob`` is used. Its importance ratio against the
    stored log-probs feeds the ratio health check (1 on an epoch's first update).
    """

    has_ratio, forward_process = True, False

    def steps(self, policy) -> torch.Tensor:
        return policy.trained_steps

    def chunk(self, ctx: ChunkContext, s: torch.Tensor, j: torch.Tensor) -> ChunkLoss:
        d, pol, k = ctx.data, ctx.policy, len(s)
        jj = torch.cat([j, j])
        x_t, x_prev, lp_old, cond, adv = d.pairs(self._sides(s), jj)
        jj = jj.to(d.device)
        with ctx.accelerator.autocast():
            out = pol.log_prob(ctx.denoiser, x_t, jj, x_prev, cond, d.uncond)
        with torch.no_grad(), ctx.reference.network() as net, ctx.accelerator.autocast():
            ref = pol.log_prob(pol.denoiser(net), x_t, jj, x_prev, cond, d.uncond)
        delta = out.log_prob.float() - ref.log_prob.float()
        res = region_d3po_loss(delta[:k], delta[k:], adv[:k], self.t.preference_beta)
        kl = gaussian_kl(out, ref) if self.t.kl_coef > 0 else None
        return ChunkLoss(res.loss, self._diagnostics(res), kl, (out.log_prob, lp_old))


class RegionDiffusionDPO(_Preference):
    """Region-level Diffusion-DPO (``diffusion_dpo``) on pairs of clean samples, :func:`pxpo.core.preference.region_dpo_loss`.

    Each item (pair p, level j) takes both images' clean latents x_0 (the trajectories' last
    latents), one noise shared by A and B (a function of the run seed, epoch, pair and j: any
    chunking and number of processes give the same points) and the level of the sampler's step j
    (DDIM: its timestep, the network's parametrisation; flow: sigma_j and the velocity target, the
    policy's ``noised``), and compares the conditional predictions (no guidance, as Diffusion-DPO
    trains) of the current weights and the reference: e_X = (pred - target)^2 - (pred_ref - target)^2
    per element, L = -log sigmoid(-beta T mean_e m_e (e_A,e - e_B,e)). No sampler log-probs: the
    trajectories are only the source of the images (any pairs of images work once encoded).
    """

    has_ratio, forward_process = False, True

    def steps(self, policy) -> torch.Tensor:
        return torch.arange(len(policy.timesteps))  # every level of the sampler's schedule

    def chunk(self, ctx: ChunkContext, s: torch.Tensor, j: torch.Tensor) -> ChunkLoss:
        d, pol, acc, k = ctx.data, ctx.policy, ctx.accelerator, len(s)
        dev = d.device
        sides = self._sides(s).to(d.latents.device)
        x0 = d.latents[sides, -1].to(dev).float()
        cond = d.cond.index(sides).to(dev)
        m = d.advantages[sides[:k]].to(dev).float()
        noise = item_noise(ctx.seed, ctx.offset // 2, s, j, tuple(x0.shape[1:])).to(dev)
        jj = torch.cat([j, j]).to(dev)
        x_t, target, t_net = pol.noised(x0, torch.cat([noise, noise]), jj)
        with acc.autocast():
            pred = ctx.denoiser(x_t, t_net, cond)
        with torch.no_grad(), acc.autocast(), ctx.reference.network() as net:
            pred_ref = pol.denoiser(net)(x_t, t_net, cond)
        err = (pred.float() - target) ** 2 - (pred_ref.float() - target) ** 2
        beta_eff = self.t.dpo_beta * pol.scheduler.config.num_train_timesteps
        res = region_dpo_loss(err[:k], err[k:], m, beta_eff)
        kl = None
        if self.t.kl_coef > 0:  # the prediction-space analogue of the step KL: mean squared distance from the reference
            kl = 0.5 * (pred.float() - pred_ref.float()) ** 2
        return ChunkLoss(res.loss, self._diagnostics(res), kl, None)
