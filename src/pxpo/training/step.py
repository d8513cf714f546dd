"""One optimizer step, computed in compute batches: the runner composed of a policy, an objective, a reference and health checks.

:func:`pxpo.training.loop.train_on_trajectories` decides WHICH (sample, timestep)
pairs make an optimizer step (the global micro-batches, each sample's permuted
trained timesteps); this module computes the step:

* the pairs go through the objective (:mod:`pxpo.training.objectives`: the
  policy's ``log_prob`` for PXPO / DDPO, a forward-process loss for NFT) in
  chunks of ``train.compute_batch`` (:class:`pxpo.training.compute_batch.ComputeBatch`);
  the runner adds ``train.kl_coef`` times the chunk's mean KL to the reference
  and feeds the importance ratio (where the objective has one) to the health check;
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

from ..core.policy import Cond
from .compute_batch import ComputeBatch, available_bytes
from .guardrails import process_max
from .objectives import ChunkContext, Objective

DEVICE_SHARE = 0.25  # keep an epoch's trajectories on the GPU when they take at most this share of its free memory


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

    Composed, not configured: every collaborator is passed in.

    Args:
        state: the :class:`pxpo.training.state.TrainState` (accelerator, unet, optimizer, params, compiled).
        policy: the :class:`pxpo.core.policy.Policy` the trajectories were sampled with.
        objective: the :class:`pxpo.training.objectives.Objective` (the chunk loss).
        data: :class:`EpochData`. t: ``cfg.train`` (batch size, kl_coef, max_grad_norm).
        compute: the run's training :class:`ComputeBatch`. guard: the run's
            :class:`pxpo.training.guardrails.StepGuard`.
        reference: the KL reference (:class:`pxpo.training.reference.Reference`) or None (``kl_coef`` 0).
        health: the run's :class:`pxpo.training.guardrails.RatioHealth`; used only when the
            objective has an importance ratio.
        seed, offset: the epoch's noise seed and this process's first global sample index
            (objectives that draw noise, :class:`pxpo.training.objectives.NFT`).
    """

    def __init__(self, state, policy, objective: Objective, data: EpochData, t, compute: ComputeBatch, guard, where: str, *,
                 reference=None, health=None, seed: int = 0, offset: int = 0):
        self.state, self.objective, self.data, self.t, self.compute, self.guard, self.where = state, objective, data, t, compute, guard, where
        self.reference = reference
        # the KL penalty: a reference with train.kl_coef > 0 (the preference objectives hold one for their loss alone)
        self.kl_on = reference is not None and t.kl_coef > 0
        self.health = health if objective.has_ratio else None
        self.names = ("loss", *objective.names, *(("kl_ref",) if self.kl_on else ()))
        acc = state.accelerator
        self.ctx = ChunkContext(
            acc, policy, data,
            denoiser=policy.denoiser((state.compiled or {}).get("train", state.unet)),  # train.compile: the compiled forward
            plain=policy.denoiser(acc.unwrap_model(state.unet)),
            params=state.params, reference=reference, seed=seed, offset=offset,
        )
        dev = data.device
        self.sums = torch.zeros(len(self.names), device=dev)  # pair-weighted, finite chunks only
        self.counts = torch.zeros((), device=dev)
        self.grad_norms: list[float] = []
        objective.begin_epoch(self.ctx)

    def _chunk(self, s, j, weight: float, last: bool, step_sums, finite):
        acc, k = self.state.accelerator, len(s)
        sync = acc.no_sync(self.state.unet) if not last else contextlib.nullcontext()
        with sync:
            out = self.objective.chunk(self.ctx, s, j)
            loss, extra = out.loss, []
            if out.kl is not None and self.kl_on:  # + kl_coef * mean per-element KL(policy || reference)
                kl = out.kl.mean()
                loss = loss + self.t.kl_coef * kl
                extra.append(kl)
            if self.health is not None and self.health.active and out.ratio is not None:  # the epoch's first update: the ratio must be 1
                self.health.observe(*out.ratio)
            self._backward(loss, k, weight)
        self._record([loss, *out.diagnostics, *extra], k, step_sums, finite)
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
        # the algorithm's batch: the first size of `auto` (a preference objective's items are pairs of two samples)
        micro = max(1, t.batch_size // acc.num_processes // (2 if self.objective.pairs else 1))
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
        if self.health is not None:  # measured only where the objective has an importance ratio
            out.update(self.health.metrics())
        return out

