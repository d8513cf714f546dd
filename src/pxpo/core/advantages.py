"""Advantages from rewards: per-prompt stat tracking for scalars and maps.

ALGORITHMS.md section 1 (DDPO's per-prompt stat tracking) and section 2.2
(PXPO's per-pixel advantages). Rewards have shape (B, *S): S = () for scalar
rewards, S = (h, w) for reward maps on the latent grid.

For each prompt in the batch, its new rewards are appended to a FIFO of the
last ``buffer_size`` rewards. While the prompt has fewer than ``min_count``
buffered entries, the whole BATCH's statistics are used; after that the
buffer's:

* baseline ``"position"`` (default for maps): one mean per position,
  mean over the buffered maps (B', h, w) -> (h, w);
* baseline ``"scalar"``: one mean over every buffered value;
* scale: one std over ALL buffered values of the prompt (population std,
  like numpy's default), so constant maps give exactly DDPO's advantages (I1).

A = (r - mean) / (std + 1e-6).
"""

from __future__ import annotations

from collections import deque
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
    """Baseline and scale of values (K, *S): mean (*S) or scalar, std scalar."""
    std = values.double().std(unbiased=False)
    mean = values.double().mean(0) if baseline == "position" else values.double().mean()
    return mean, std


class PerPromptStatTracker:
    """Per-prompt FIFO buffers of rewards (scalars or maps) -> advantages.

    Args:
        buffer_size: rewards kept per prompt (16 or 32 in DDPO's configs).
        min_count: buffered entries needed before the prompt's own statistics
            replace the batch's.
        baseline: ``"position"`` (per-position mean map) or ``"scalar"``.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, baseline: str = "position"):
        if baseline not in ("position", "scalar"):
            raise ValueError(f"baseline must be 'position' or 'scalar', got {baseline!r}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.baseline = baseline
        self.buffers: dict[str, deque] = {}

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
            buf.extend(rewards[idx].unbind(0))
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = _stats(torch.stack(list(buf)), self.baseline)
            adv[idx] = (rewards[idx] - mean) / (std + EPS)
        return adv.float()

    def stats(self) -> dict:
        """Number of tracked prompts and mean buffer length (for logging)."""
        lens = [len(b) for b in self.buffers.values()]
        return {"prompts": len(lens), "mean_buffer": sum(lens) / max(1, len(lens))}

    def state_dict(self) -> dict:
        """Picklable state (buffers as lists of tensors) for checkpoints."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "baseline": self.baseline,
            "buffers": {k: [t.clone() for t in v] for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.baseline = state["baseline"]
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}
