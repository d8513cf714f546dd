"""One optimizer step of the policy-gradient update, computed in compute batches.

:func:`pxpo.training.loop.train_on_trajectories` decides WHICH (sample, timestep)
pairs make an optimizer step (the global micro-batches, each sample's permuted
trained timesteps); this module computes the step:

* the pairs go through the policy's ``log_prob`` in chunks of
  ``train.compute_batch`` (:class:`pxpo.training.compute_batch.ComputeBatch`), each
  chunk one network call (cond and uncond together under guidance);
* the gradient is (1/P) times the sum over the step's P pairs of each pair's
  loss (the mean over its latent elements): the same gradient as P / b micro-
  steps of b pairs each, as Accelerate's accumulation computed before, for any
  chunking. Under DDP only the step's last chunk all-reduces (``no_sync``);
  the N processes' gradients are averaged, as for one micro-batch.
* diagnostics (loss, approx_kl, clipfrac, ratio, pair-weighted, non-finite
  chunks left out) stay on the device; the host reads one (grad norm, finite)
  pair per optimizer step for the guardrail, and the epoch's sums once
  (:meth:`StepRunner.logs`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .compute_batch import ComputeBatch, available_bytes
from ..core.losses import DIAGNOSTICS as LOSS_DIAGNOSTICS, LossOutput, ddpo_loss, pxpo_loss
from ..core.policy import Cond

DIAGNOSTICS = ("loss", *LOSS_DIAGNOSTICS, "kl_ref")  # + clipfrac_element / clipfrac_mean / log_ratio_rms_* (core/losses.py); kl_ref: KL to the reference
DEVICE_SHARE = 0.25  # keep an epoch's trajectories on the GPU when they take at most this share of its free memory


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, t) -> LossOutput:
    """PXPO or DDPO loss (``train.algorithm``) of per-element log-probs (B, C, h, w); adv (B, h, w) or (B,)."""
    kw = dict(mode=t.loss, clip_range=t.clip_range, adv_clip_max=t.adv_clip_max, max_log_ratio=t.max_log_ratio)
    if t.algorithm == "ddpo":
        return ddpo_loss(log_prob, old_log_prob, adv, **kw)
    return pxpo_loss(log_prob, old_log_prob, adv, ratio=t.ratio, **kw)


class EpochData:
    """An epoch's trajectories and advantages where training reads them: on the device when they fit.

    On CPU, or on CUDA when they take at most :data:`DEVICE_SHARE` of the free
    memory, every tensor is moved once; otherwise they stay in (pinned) host
    memory and each chunk is copied over.
    """

    def __init__(self, traj, advantages: torch.Tensor, device):
        device = torch.device(device)
        tensors = [traj.latents, traj.log_probs, advantages, *(v for v in vars(traj.cond()).values() if v is not None)]
        nbytes = sum(x.numel() * x.element_size() for x in tensors)
        avail = available_bytes(device)
        self.on_device = avail is None or nbytes <= DEVICE_SHARE * avail
        where = device if self.on_device else torch.device("cpu")
        pin = not self.on_device and device.type == "cuda"

        def put(x):
            x = x.to(where)
            return x.pin_memory() if pin else x

        self.device = device
        self.latents, self.log_probs, self.advantages = put(traj.latents), put(traj.log_probs), put(advantages)
        self.cond = traj.cond().apply(put)
        self.uncond = traj.uncond().to(device)

    def pairs(self, s: torch.Tensor, j: torch.Tensor):
        """Pairs (sample s, transition j), s and j (K,): x_t, x_prev, old log-probs (K, C, h, w), Cond, advantages."""
        dev, nb = self.device, not self.on_device
        s_, j_ = s.to(self.latents.device), j.to(self.latents.device)
        x_t = self.latents[s_, j_].to(dev, non_blocking=nb)
        x_prev = self.latents[s_, j_ + 1].to(dev, non_blocking=nb)
        lp_old = self.log_probs[s_, j_].to(dev, non_blocking=nb)
        cond: Cond = self.cond.index(s_).to(dev)
        return x_t, x_prev, lp_old, cond, self.advantages[s_].to(dev, non_blocking=nb)


class StepRunner:
    """Computes optimizer steps on an epoch's data; holds the epoch's device-side diagnostics.

    Args:
        state: the :class:`pxpo.training.state.TrainState` (accelerator, unet, optimizer, params).
        policy: the :class:`pxpo.core.policy.Policy` the trajectories were sampled with.
        data: :class:`EpochData`. t: ``cfg.train``. compute: the run's training
            :class:`ComputeBatch`. guard: the run's :class:`pxpo.training.guardrails.StepGuard`.
    """

    names = DIAGNOSTICS  # what _chunk's diagnostics vector holds (a subclass with another loss names its own)

    def __init__(self, state, policy, data: EpochData, t, compute: ComputeBatch, guard, where: str):
        self.state, self.policy, self.data, self.t, self.compute, self.guard, self.where = state, policy, data, t, compute, guard, where
        self.denoiser = policy.denoiser((state.compiled or {}).get("train", state.unet))  # train.compile: the compiled forward
        dev = data.device
        self.sums = torch.zeros(len(self.names), device=dev)  # pair-weighted, finite chunks only
        self.counts = torch.zeros((), device=dev)
        self.grad_norms: list[float] = []
        # issue 16: the KL penalty's reference (pxpo.training.reference; None: train.kl_coef 0) and the ratio health check
        self.reference, self.health = state.extras.get("kl_reference"), state.extras.get("ratio_health")

    def _chunk(self, s, j, weight: float, last: bool, step_sums, finite):
        acc, d = self.state.accelerator, self.data
        x_t, x_prev, lp_old, cond, adv = d.pairs(s, j)
        j = j.to(d.device)
        k = len(s)
        sync = acc.no_sync(self.state.unet) if not last else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                out = self.policy.log_prob(self.denoiser, x_t, j, x_prev, cond, d.uncond)
            res = policy_loss(out.log_prob, lp_old, adv, self.t)
            loss, kl = res.loss, torch.zeros((), device=res.loss.device)
            if self.reference is not None:  # + kl_coef * mean per-element KL(policy || reference)
                kl = self.reference.kl(self.policy, out, x_t, j, x_prev, cond, d.uncond, acc.autocast).mean()
                loss = loss + self.t.kl_coef * kl
            if self.health is not None and self.health.active:  # the epoch's first update: the ratio must be 1
                self.health.observe(out.log_prob, lp_old)
            self._backward(loss, k, weight)
        self._record([loss, *res.diagnostics().values(), kl], k, step_sums, finite)
        return k

    def _backward(self, loss: torch.Tensor, k: int, weight: float) -> None:
        """Back-propagate a chunk of ``k`` pairs' mean ``loss`` with its share of the step (``k * weight``)."""
        acc = self.state.accelerator
        # Accelerate divides by its gradient_accumulation_steps: undo it, the weights here are the whole scaling.
        acc.backward(loss * (k * weight * acc.gradient_accumulation_steps))

    @staticmethod
    @torch.no_grad()
    def _record(values, k: int, step_sums, finite) -> None:
        """Add a chunk's diagnostics (0-d tensors in :attr:`names` order, the loss first) for ``k`` pairs, if its loss is finite."""
        vals = torch.stack(list(values)).float().detach()
        fin = torch.isfinite(vals[0])
        step_sums[0] += torch.where(fin, vals * k, torch.zeros_like(vals))
        step_sums[1] += fin.float() * k
        finite &= fin

    def step(self, s: torch.Tensor, j: torch.Tensor, bar=None) -> None:
        """One optimizer step on the pairs (s[i], j[i]), s and j (P,) local sample / transition indices."""
        acc, t, state = self.state.accelerator, self.t, self.state
        total, weight = len(s), 1.0 / len(s)
        micro = t.batch_size // acc.num_processes  # the algorithm's batch: the first size of `auto`
        dev = self.data.device
        step_sums = [torch.zeros(len(self.names), device=dev), torch.zeros((), device=dev)]
        finite = torch.ones((), dtype=torch.bool, device=dev)

        def restart():
            state.optimizer.zero_grad(set_to_none=True)
            step_sums[0].zero_(), step_sums[1].zero_(), finite.fill_(True)

        def chunk(c: slice):
            k = self._chunk(s[c], j[c], weight, c.stop == total, step_sums, finite)
            if bar is not None:
                bar.update(k)

        self.compute.run(total, micro, chunk, restart=restart)
        if self.health is not None and self.health.active:  # before the first step is taken (pxpo.training.guardrails.RatioHealth)
            from .guardrails import process_max

            self.health.first_update(self.where, reduce=process_max(acc))
        # guardrail: the same decision on every process (gradients are all-reduced)
        gn = acc.clip_grad_norm_(state.params, t.max_grad_norm)
        flag = finite.float()
        if acc.num_processes > 1:  # a non-finite loss on any process skips the step on all
            flag = (acc.reduce(flag, "sum") == acc.num_processes).float()
        gn, ok = torch.stack([torch.as_tensor(gn, device=dev).float(), flag]).tolist()  # the step's one host sync
        ok = bool(ok)
        if getattr(acc, "scaler", None) is not None and ok and not math.isfinite(gn):
            state.optimizer.step()  # fp16 overflow: GradScaler skips the step and lowers its scale
        elif self.guard.check(gn, ok, where=self.where):
            state.optimizer.step()
            self.grad_norms.append(gn)
        state.optimizer.zero_grad(set_to_none=True)
        self.sums += step_sums[0]
        self.counts += step_sums[1]

    def logs(self) -> dict:
        """Mean diagnostics over the epoch's pairs (finite chunks), mean grad norm, optimizer_steps."""
        sums, n = self.sums.tolist(), float(self.counts)
        out = {k: (v / n if n else float("nan")) for k, v in zip(self.names, sums)}
        out["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else float("nan")
        out["optimizer_steps"] = len(self.grad_norms)
        if self.reference is None:
            out.pop("kl_ref", None)  # not measured without a reference (train.kl_coef 0)
        return out

