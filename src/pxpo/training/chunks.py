"""The objective protocol's data: what a chunk is computed with (:class:`ChunkContext`) and what it
returns (:class:`ChunkLoss`), the :class:`Objective` protocol itself (documented in
:mod:`pxpo.training.objectives`), and the per-item noise of forward-process objectives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.policy import batch_randn


@dataclass
class ChunkContext:
    """What an objective computes a chunk with; built once per epoch by the step runner.

    Attributes:
        accelerator: the run's Accelerator (``autocast``).
        policy: the :class:`pxpo.core.policy.Policy` the trajectories were sampled with.
        data: the epoch's :class:`pxpo.training.step.EpochData`.
        denoiser: the trained network's denoiser (DDP-wrapped or compiled: gradients flow).
        plain: the same network unwrapped (no DDP, no compile) for no-grad forwards that
            must not take part in DDP's gradient synchronisation.
        params: the trainable parameters (NFT swaps the sampling policy's values in).
        reference: the KL reference (:class:`pxpo.training.reference.Reference`) or None.
        seed: the epoch's noise seed (run seed and epoch folded in); offset: this
            process's first global sample index.
    """

    accelerator: object
    policy: object
    data: object
    denoiser: object
    plain: object
    params: list
    reference: object = None
    seed: int = 0
    offset: int = 0


@dataclass
class ChunkLoss:
    """A chunk's loss terms.

    Attributes:
        loss: the objective's loss (mean over the chunk's pairs), with gradients.
        diagnostics: detached 0-d tensors in the objective's ``names`` order.
        kl: (K, C, h, w) per-element KL to the reference (gradients through the policy), or None.
        ratio: (log_prob, old_log_prob), per element, for the ratio health check; None without a ratio.
    """

    loss: torch.Tensor
    diagnostics: list[torch.Tensor]
    kl: torch.Tensor | None = None
    ratio: tuple[torch.Tensor, torch.Tensor] | None = None


class Objective(Protocol):
    per_sample: bool
    has_ratio: bool
    forward_process: bool
    stateful: bool
    pairs: bool
    names: tuple[str, ...]

    def steps(self, policy) -> torch.Tensor: ...

    def begin_epoch(self, ctx: ChunkContext) -> None: ...

    def end_epoch(self, ctx: ChunkContext, optimizer_steps: int) -> None: ...

    def sampling(self, params) -> contextlib.AbstractContextManager: ...

    def chunk(self, ctx: ChunkContext, s: torch.Tensor, j: torch.Tensor) -> ChunkLoss: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def item_noise(seed: int, offset: int, s: torch.Tensor, j: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(K, *shape) standard noise of items (s, j): a function of (seed, offset + s, j) only, for any chunking."""
    gens = [torch.Generator().manual_seed((seed * 1_000_003 + offset + int(a)) * 1_009 + int(b)) for a, b in zip(s, j)]
    return batch_randn((len(s), *shape), gens)
