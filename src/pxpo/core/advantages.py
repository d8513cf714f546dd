"""Advantages from rewards: per-prompt stat tracking and GRPO groups, for scalars and maps.

ALGORITHMS.md section 1 (DDPO's per-prompt stat tracking), section 2.2
(PXPO's per-pixel advantages) and section 4 (GRPO's group-relative advantages:
:func:`group_advantages`, :class:`GroupRelative`, at the end of this module). Rewards have shape (B, *S): S = () for scalar
rewards, S = (h, w) for reward maps on the latent grid.

For each prompt in the batch, its new rewards are appended to a FIFO of the
last ``buffer_size`` rewards. While the prompt has fewer than ``min_count``
buffered entries, the whole BATCH's statistics are used; after that the
buffer's:

* baseline ``"position"`` (default for maps): one mean per position,
  mean over the buffered maps (B', h, w) -> (h, w);
* baseline ``"scalar"``: one mean over every buffered value;
* scale: one population std of the RESIDUALS r - baseline over all buffered
  values of the prompt. For the scalar baseline that is the std of the raw
  values; for the position baseline it leaves out any fixed spatial pattern
  (e.g. ``mask_region``'s +1 inside / -1 outside), which the baseline removes
  and which must not shrink the advantages. Constant maps have residuals equal
  to DDPO's, so they give exactly DDPO's advantages (I1).

A = (r - mean) / (std + 1e-6).

Memory: buffers are float32, and at most ``max_bytes`` of buffered values are
kept; past that the least recently updated prompts are dropped whole (they
fall back to batch statistics until they have ``min_count`` entries again).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-6


def to_latent_grid(maps: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Map image-space reward maps (B, H, W) to the latent grid (B, h, w).

    Area averaging (adaptive average pooling by the VAE factor), ALGORITHMS.md
    2.1. For a pixel-space model (h, w) == (H, W) and the map is returned as is.
    """
    if tuple(maps.shape[-2:]) == tuple(latent_hw):
        return maps.float()
    return F.adaptive_avg_pool2d(maps.float()[:, None], latent_hw)[:, 0]


def _stats(values: torch.Tensor, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline and scale of values (K, *S): mean (*S) or scalar; std of the residuals, scalar."""
    v = values.double()
    mean = v.mean(0) if baseline == "position" else v.mean()
    std = (v - mean).pow(2).mean().sqrt()
    return mean, std


class PerPromptStatTracker:
    """Per-prompt FIFO buffers of rewards (scalars or maps) -> advantages.

    Args:
        buffer_size: rewards kept per prompt (16 or 32 in DDPO's configs).
        min_count: buffered entries needed before the prompt's own statistics
            replace the batch's.
        baseline: ``"position"`` (per-position mean map) or ``"scalar"``.
        max_bytes: bound on the buffered values (float32 bytes, all prompts);
            the least recently updated prompts are dropped past it. None: no bound.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, baseline: str = "position", max_bytes: int | None = None):
        if baseline not in ("position", "scalar"):
            raise ValueError(f"baseline must be 'position' or 'scalar', got {baseline!r}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.baseline = baseline
        self.max_bytes = max_bytes
        self.buffers: OrderedDict[str, deque] = OrderedDict()
        self.evicted = 0

    def nbytes(self) -> int:
        """Bytes of buffered values (float32)."""
        return sum(len(b) * b[0].numel() * 4 for b in self.buffers.values() if b)

    def _evict(self, keep: set[str]) -> None:
        """Drop least recently updated prompts (not in ``keep``) until within ``max_bytes``."""
        if self.max_bytes is None:
            return
        total = self.nbytes()
        for prompt in list(self.buffers):
            if total <= self.max_bytes:
                break
            if prompt in keep:
                continue
            b = self.buffers.pop(prompt)
            total -= len(b) * (b[0].numel() * 4 if b else 0)
            self.evicted += 1

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Append ``rewards`` (B, *S) to the prompts' buffers; return advantages (B, *S) float32."""
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} rewards")
        rewards = rewards.detach().cpu().double()
        adv = torch.empty_like(rewards)
        batch_mean, batch_std = _stats(rewards, self.baseline)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            self.buffers.move_to_end(prompt)
            buf.extend(r.float() for r in rewards[idx].unbind(0))
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = _stats(torch.stack(list(buf)), self.baseline)
            adv[idx] = (rewards[idx] - mean) / (std + EPS)
        self._evict(set(prompts))
        return adv.float()

    def stats(self) -> dict:
        """Number of tracked prompts and mean buffer length (for logging)."""
        lens = [len(b) for b in self.buffers.values()]
        return {
            "prompts": len(lens),
            "mean_buffer": sum(lens) / max(1, len(lens)),
            "tracker_mb": self.nbytes() / 2**20,
            "evicted_prompts": self.evicted,
        }

    def state_dict(self) -> dict:
        """Picklable state for checkpoints: prompts in LRU order, their buffer
        lengths, and ONE float32 tensor (sum of lengths, *S) of all values."""
        prompts = [k for k, v in self.buffers.items() if v]
        values = [t for k in prompts for t in self.buffers[k]]
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "baseline": self.baseline,
            "max_bytes": self.max_bytes,
            "evicted": self.evicted,
            "prompts": prompts,
            "lengths": [len(self.buffers[k]) for k in prompts],
            "values": torch.stack(values).float() if values else torch.zeros(0),
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.baseline = state["baseline"]
        self.max_bytes = state.get("max_bytes", self.max_bytes)
        self.evicted = state.get("evicted", 0)
        self.buffers = OrderedDict()
        if "buffers" in state:  # checkpoints written before the packed format
            for k, v in state["buffers"].items():
                self.buffers[k] = deque((t.float() for t in v), maxlen=self.buffer_size)
            return
        chunks = state["values"].float().split(state["lengths"]) if state["prompts"] else []
        for k, chunk in zip(state["prompts"], chunks):
            self.buffers[k] = deque(chunk.unbind(0), maxlen=self.buffer_size)


GROUP_EPS = 1e-4  # Flow-GRPO's stat tracker adds 1e-4 to the std


def group_advantages(
    prompts: Sequence[str], rewards: torch.Tensor, *, baseline: str = "position", std: str = "group", eps: float = GROUP_EPS
) -> torch.Tensor:
    """Group-relative advantages (GRPO; Flow-GRPO arXiv 2505.05470 eq. 4) of one epoch's rewards.

    A group is every sample of the epoch with the same prompt (``sample.group_size``
    draws each prompt G times). Rewards (B, *S): S = () scalars, (h, w) maps.

    * baseline: the group's mean; per position for maps with ``"position"``
      (mean over the group's maps, (h, w)), one mean with ``"scalar"``.
    * ``std="group"``: the spread is one population std of the group's RESIDUALS
      (r - group mean) over all its values, as the per-prompt tracker does
      (ALGORITHMS.md 2.2): a fixed spatial pattern that the baseline removes does
      not shrink the advantages.
    * ``std="global"``: Flow-GRPO's reference (``global_std``): one std over the
      whole epoch, of the residuals from the EPOCH's mean (per position for maps);
      for scalars this is np.std of all rewards.

    A = (r - mean_group) / (spread + eps). No state: every epoch stands alone.
    Constant maps give exactly the scalar advantages (I5).
    """
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} rewards")
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    r = rewards.detach().cpu().double()
    adv = torch.empty_like(r)
    global_spread = _stats(r, baseline)[1] if std == "global" else None
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        mean, spread = _stats(r[idx], baseline)
        adv[idx] = (r[idx] - mean) / ((spread if global_spread is None else global_spread) + eps)
    return adv.float()


class GroupRelative:
    """GRPO's advantage estimator with the tracker's interface (``update``, ``stats``, state dicts).

    Args:
        baseline: ``"position"`` or ``"scalar"`` (see :func:`group_advantages`).
        std: ``"group"`` or ``"global"``.
    """

    def __init__(self, baseline: str = "position", std: str = "group", eps: float = GROUP_EPS):
        if baseline not in ("position", "scalar"):
            raise ValueError(f"baseline must be 'position' or 'scalar', got {baseline!r}")
        self.baseline, self.std, self.eps = baseline, std, eps
        self.last_group_size = 0.0

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (B, *S) float32 of this epoch's rewards (B, *S)."""
        self.last_group_size = len(prompts) / max(1, len(set(prompts)))
        return group_advantages(prompts, rewards, baseline=self.baseline, std=self.std, eps=self.eps)

    def stats(self) -> dict:
        return {"mean_group_size": self.last_group_size}

    def state_dict(self) -> dict:  # stateless across epochs; kept for checkpointing symmetry
        return {"baseline": self.baseline, "std": self.std, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.std, self.eps = state["baseline"], state["std"], state["eps"]
