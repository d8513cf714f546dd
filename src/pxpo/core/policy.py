"""The policy protocol: one small contract every sampler module implements.

The loop (:mod:`pxpo.training.rollout`, :mod:`pxpo.training.loop`) holds ONE policy object and
never asks which sampler it is (diffusers' answer for schedulers: one class per
file with the same ``step()``). Implementations: :class:`pxpo.core.ddim.DDIMPolicy`
(stochastic DDIM, DDPO arXiv 2305.13301), :class:`pxpo.core.lcm.LCMPolicy`
(multi-step consistency sampling, RLCM arXiv 2404.03673); a third (the flow SDE
of Flow-GRPO, arXiv 2505.05470) implements the same four members.

Shapes: N samples, T steps, latents (C, h, w) (or any (...) a network takes),
L tokens of D features, P pooled features.

The contract (:class:`Policy`):

``timesteps``: (T,) int64 on CPU, the network timesteps in sampling order,
    fixed when the policy is built (``scheduler.set_timesteps`` is called once,
    by the constructor; nothing else may change them).
``trained_steps``: (K,) int64 on CPU, the indices j in [0, T) of the
    transitions x_j -> x_{j+1} the loss trains on (DDIM: all T; LCM: the first
    T - 1; a windowed SDE: the window). ``train.timestep_fraction`` keeps a
    fraction of them per sample.
``denoiser(net) -> Denoiser``: the network adapter this policy samples with
    (:class:`Denoiser` for SD / SDXL UNets; a subclass where a family calls its
    network differently).
``sample(denoiser, cond, uncond, latent_shape, generators) -> Rollout``: N
    trajectories, every latent and per-element log-prob kept; ``final`` is the
    latent decoded for the reward. Noise comes from ``generators`` (one CPU
    ``torch.Generator`` per sample, via :func:`batch_randn`), so a sample is
    the same in any batch.
``log_prob(denoiser, x_t, step_index, x_prev, cond, uncond) -> StepOutput``:
    re-score stored transitions j = ``step_index`` (B,) (one per sample, may
    differ) under the current weights; gradients flow through ``mean`` only.
    It must equal the stored ``Rollout.log_probs[:, j]`` for unchanged weights
    (the pinned "recomputed equals stored" tests).

Everything else is derived from :class:`StepOutput`: the PPO ratio from
``log_prob``; a KL to a reference policy from two StepOutputs of the same
transition (:func:`gaussian_kl`, per element); ratio-health diagnostics from
``log_prob`` minus the stored one.

A policy class has a ``from_config(sample_cfg, scheduler)`` classmethod and a
``scheduler_class`` attribute; :data:`pxpo.core.policies.POLICIES` maps each
``sample.sampler`` name to its class (imported there by name, no import tricks),
and :func:`pxpo.core.policies.make_policy` builds one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch

from .kl import gaussian_kl as elementwise_kl

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------- data


@dataclass
class Cond:
    """The conditioning of a batch: what the network needs besides (x, t).

    Attributes:
        embeds: (B, L, D) token embeddings (``encoder_hidden_states``).
        pooled: (B, P) pooled text embeddings or None (SDXL ``text_embeds``,
            SD3 ``pooled_projections``).
        time_ids: (B, 6) SDXL's added time ids (original size, crop, target
            size) or None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def apply(self, fn) -> Cond:
        """fn applied to every field that is set."""
        return Cond(*(None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)))

    def index(self, idx) -> Cond:
        """Rows ``idx`` (an int slice, index tensor or list) of every field."""
        return self.apply(lambda v: v[idx])

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cond:
        """Moved to ``device``; floating fields cast to ``dtype`` (time ids too: SDXL embeds them as floats)."""
        return self.apply(lambda v: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None))

    def expand(self, b: int) -> Cond:
        """A batch-1 Cond broadcast to B rows (a batch of B is returned as is)."""
        return self if len(self) == b else self.apply(lambda v: v.expand(b, *v.shape[1:]))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """Rows of several Conds stacked (all with the same fields set)."""
        first = conds[0]
        return Cond(*(None if getattr(first, f.name) is None else torch.cat([getattr(c, f.name) for c in conds]) for f in fields(Cond)))


@dataclass
class StepOutput:
    """One Gaussian transition x_t -> x_prev of a policy.

    Attributes:
        prev_sample: the action x_prev, (B, ...); sampled, or the given one.
        log_prob: per-element log N(x_prev; mean, std^2), (B, ...), float32.
        mean: mu, (B, ...); carries the gradient (through the network).
        std: sigma, broadcastable to (B, ...), e.g. (B, 1, 1, 1); > 0.
        denoised: the clean-sample estimate of this step where the policy has
            one that is rewarded (LCM's f_theta output), else None.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    denoised: torch.Tensor | None = None


@dataclass
class Rollout:
    """A batch of sampled trajectories.

    Attributes:
        latents: x_T .. x_0, (N, T+1, C, h, w), float32.
        log_probs: per-element log pi(x_{j+1} | x_j, c), (N, T, C, h, w), float32.
        timesteps: the network timesteps in sampling order, (T,) int64, CPU.
        final: the latent decoded for the reward, (N, C, h, w): x_0 for DDIM,
            the last f_theta output for LCM. None means ``latents[:, -1]``.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    final: torch.Tensor | None = None

    def __post_init__(self):
        if self.final is None:
            self.final = self.latents[:, -1]


# ---------------------------------------------------------------- maths shared by policies


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x; mean, std^2): -(x-mean)^2/(2 std^2) - log std - log(2 pi)/2."""
    return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI


def gaussian_kl(p: StepOutput, ref: StepOutput) -> torch.Tensor:
    """Per-element KL(p || ref) of two transitions with the SAME std: (mean_p - mean_ref)^2 / (2 std^2).

    (B, ...). Both step outputs come from one policy's ``log_prob`` on the same
    (x_t, step_index), one with the trained weights and one with the reference
    (e.g. LoRA adapters disabled); the std depends on the schedule only.
    """
    return elementwise_kl(p.mean, ref.mean.detach(), p.std)


def batch_randn(shape: tuple[int, ...], generator=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) on CPU.

    ``generator`` may be one torch.Generator or a list of B generators (one per
    sample, so each sample is reproducible from its own seed alone).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


class BranchingGenerators(list):
    """One CPU ``torch.Generator`` per sample, some of which switch to a new seed at one step (aligned pairs).

    Sample B of an aligned pair (issue 24) starts from the generator of its pair's sample A, seeded
    with A's seed, so its initial noise and the noise of its first ``k`` steps are A's; at step k
    (before that step's noise is drawn) its generator is re-seeded with B's own seed and the two
    trajectories branch. A plain list of generators never branches.

    Args:
        generators: B generators (the sampling seeds already applied).
        branches: ``{row: (step k, new seed)}`` for the rows that branch.
    """

    def __init__(self, generators, branches: dict[int, tuple[int, int]]):
        super().__init__(generators)
        self.branches = dict(branches)

    def begin_step(self, j: int) -> None:
        """Called by the sampling loops before step j draws its noise: re-seed the rows that branch at j."""
        for row, (k, seed) in self.branches.items():
            if k == j:
                self[row].manual_seed(seed)


def begin_step(generators, j: int) -> None:
    """Before step j of a rollout: lets :class:`BranchingGenerators` branch (no-op for any other generators)."""
    if isinstance(generators, BranchingGenerators):
        generators.begin_step(j)


def base_network(net):
    """The network inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if inner is None or inner is net:
            return net
        net = inner


# ---------------------------------------------------------------- network adapter


class Denoiser:
    """Calls a denoising network with a :class:`Cond`, classifier-free guidance in ONE call.

    This class serves SD 1.x/2.x UNets (``encoder_hidden_states`` only) and SDXL
    UNets (``added_cond_kwargs`` text_embeds = ``pooled``, time_ids). A model
    family that calls its network differently (SD3's transformer:
    ``pooled_projections``) subclasses it and overrides :meth:`forward`.

    Args:
        net: the network (possibly DDP / torch.compile wrapped: its forward is
            what is called, so DDP syncs gradients).
        dtype: cast x and cond to this dtype before the call (sampling without
            autocast); None leaves them (training under autocast).
    """

    def __init__(self, net, dtype: torch.dtype | None = None):
        self.net = net
        self.dtype = dtype

    @property
    def config(self):
        """The (unwrapped) network's config."""
        return base_network(self.net).config

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, **kwargs) -> torch.Tensor:
        """One network call, no guidance: x (B, ...), t (B,), cond of B rows -> (B, ...)."""
        if cond.pooled is not None or cond.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.net(x, t, encoder_hidden_states=cond.embeds, **kwargs).sample

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor | int, cond: Cond, uncond: Cond | None = None, guidance_scale: float = 1.0, **kwargs
    ) -> torch.Tensor:
        """Guided prediction: out_u + w (out_c - out_u), cond and uncond batched in one call.

        Args:
            x: (B, ...) noisy latents; t: an int, a 0-d or a (B,) tensor.
            cond: B rows; uncond: 1 or B rows (negative prompt), or None.
            guidance_scale: w; w <= 1 or no ``uncond`` is one conditional pass.
            kwargs: passed to the network (e.g. ``timestep_cond``), doubled
                along the batch under guidance when they are (B, ...) tensors.

        Returns:
            (B, ...) prediction in the network's parametrisation.
        """
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if self.dtype is not None:
            x, cond = x.to(self.dtype), cond.to(dtype=self.dtype)
            uncond = None if uncond is None else uncond.to(dtype=self.dtype)
        if uncond is None or guidance_scale <= 1.0:
            return self.forward(x, t, cond, **kwargs)
        both = Cond.cat([uncond.expand(b), cond])
        kwargs = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (b,) else v for k, v in kwargs.items()}
        out_u, out_c = self.forward(torch.cat([x, x]), torch.cat([t, t]), both, **kwargs).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)


# ---------------------------------------------------------------- the protocol


@runtime_checkable
class Policy(Protocol):
    """What the loop needs of a sampler (module docstring: the contract)."""

    timesteps: torch.Tensor
    trained_steps: torch.Tensor

    def denoiser(self, net, dtype: torch.dtype | None = None) -> Denoiser: ...

    def sample(
        self, denoiser: Denoiser, cond: Cond, uncond: Cond | None, latent_shape: tuple[int, ...], generators, *, progress: bool = False
    ) -> Rollout: ...

    def log_prob(
        self, denoiser: Denoiser, x_t: torch.Tensor, step_index: torch.Tensor, x_prev: torch.Tensor, cond: Cond, uncond: Cond | None
    ) -> StepOutput: ...


class PolicyBase:
    """Shared plumbing of the implementations: the timesteps, the default adapter and the sampling loop.

    A subclass sets ``self.scheduler``, ``self.timesteps``, ``self.trained_steps``,
    ``self.guidance_scale`` and implements :meth:`step`: one transition j from
    the network output. :meth:`sample` and :meth:`log_prob` are then generic.
    """

    scheduler: object
    timesteps: torch.Tensor
    trained_steps: torch.Tensor
    guidance_scale: float

    def denoiser(self, net, dtype: torch.dtype | None = None) -> Denoiser:
        return Denoiser(net, dtype)

    def step(self, model_output, step_index: torch.Tensor, x_t, x_prev=None, generator=None) -> StepOutput:
        """Transition ``step_index`` (B,) from the network output; sample x_prev when None."""
        raise NotImplementedError

    def predict(self, denoiser: Denoiser, x_t, step_index: torch.Tensor, cond: Cond, uncond: Cond | None):
        t = self.timesteps.to(x_t.device)[step_index.to(x_t.device)]
        return denoiser(x_t, t, cond, uncond, self.guidance_scale)

    def log_prob(self, denoiser, x_t, step_index, x_prev, cond, uncond) -> StepOutput:
        step_index = torch.as_tensor(step_index).long().expand(x_t.shape[0])
        return self.step(self.predict(denoiser, x_t, step_index, cond, uncond), step_index, x_t, x_prev=x_prev)

    @torch.no_grad()
    def sample(self, denoiser, cond, uncond, latent_shape, generators, *, progress: bool = False) -> Rollout:
        from tqdm.auto import tqdm

        n, device = len(cond), cond.embeds.device
        x = batch_randn((n, *latent_shape), generators).to(device) * self.scheduler.init_noise_sigma
        latents, log_probs, final = [x.float()], [], None
        for j in tqdm(range(len(self.timesteps)), desc="sampling", disable=not progress, leave=False):
            idx = torch.full((n,), j, dtype=torch.long)
            begin_step(generators, j)  # aligned pairs: B's noise branches from A's at step k
            out = self.step(self.predict(denoiser, x, idx, cond, uncond), idx, x, generator=generators)
            x = out.prev_sample.float()
            final = out.denoised
            latents.append(x)
            log_probs.append(out.log_prob)
        return Rollout(torch.stack(latents, 1), torch.stack(log_probs, 1), self.timesteps.clone(), final)
