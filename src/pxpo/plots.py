"""Figures: reward curves (matplotlib, headless) and image grids, as PNG."""

from __future__ import annotations

import math
from pathlib import Path


def reward_curve(histories: dict[str, list[dict]], path: Path, x: str = "samples_seen", title: str = "mean reward") -> None:
    """Plot ``reward_mean`` (+- std band when present) against ``x`` for each named history.

    Args:
        histories: name -> list of per-epoch metric dicts (``reward_mean``,
            optionally ``reward_std`` and the x key).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import atomic_file

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, hist in histories.items():
        xs = [h.get(x, i) for i, h in enumerate(hist)]
        ys = [h["reward_mean"] for h in hist]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("reward (map mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(Path(path), "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def save_grid(images, path: Path, nrow: int, scale: int = 4) -> None:
    """Write images (B, 3, H, W) in [0, 1] as one PNG grid (``nrow`` per row), upscaled ``scale`` x."""
    import numpy as np
    import torch
    from PIL import Image

    from .storage import atomic_file

    b, c, h, w = images.shape
    ncol = math.ceil(b / nrow)
    grid = torch.zeros(3, ncol * (h + 1), nrow * (w + 1))
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = im
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    with atomic_file(Path(path), "wb") as f:
        img.save(f, format="PNG")
