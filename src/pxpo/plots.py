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


def grid_image(images, nrow: int, scale: int = 4, row_labels: list[str] | None = None):
    """Images (B, 3, H, W) in [0, 1] as one PIL image grid (``nrow`` per row), upscaled ``scale`` x.

    ``row_labels``: one text per grid row (``""`` for none), written in a left margin.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    b, c, h, w = images.shape
    ncol = math.ceil(b / nrow)
    grid = torch.zeros(3, ncol * (h + 1), nrow * (w + 1))
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = im
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    if row_labels and any(row_labels):
        font = ImageFont.load_default()
        draw = ImageDraw.Draw(img)
        margin = int(max(draw.textlength(t, font=font) for t in row_labels)) + 8
        labelled = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
        labelled.paste(img, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, text in enumerate(row_labels[:ncol]):
            if text:
                draw.text((4, r * (h + 1) * scale + 4), text, fill=(0, 0, 0), font=font)
        img = labelled
    return img


def save_png(img, path: Path) -> None:
    """Write a PIL image as PNG, atomically."""
    from .storage import atomic_file

    with atomic_file(Path(path), "wb") as f:
        img.save(f, format="PNG")


def save_grid(images, path: Path, nrow: int, scale: int = 4, row_labels: list[str] | None = None) -> None:
    """Write images (B, 3, H, W) in [0, 1] as one PNG grid (:func:`grid_image`)."""
    save_png(grid_image(images, nrow, scale, row_labels), path)


def labelled_grid_image(blocks: dict, nrow: int, scale: int = 4):
    """Blocks of images ``{label: (B_k, 3, H, W)}`` as one PIL grid, each block starting a row, labelled on its first row.

    Blocks are padded with mid-grey to whole rows, so the i-th images of equal-sized blocks line up
    (e.g. ``{"base": ..., "policy": ...}`` with the same prompts and seeds).
    """
    import torch

    parts, labels = [], []
    for label, images in blocks.items():
        rows = max(1, math.ceil(images.shape[0] / nrow))
        pad = torch.full((rows * nrow - images.shape[0], *images.shape[1:]), 0.5)
        parts += [images.float().cpu(), pad]
        labels += [label] + [""] * (rows - 1)
    return grid_image(torch.cat(parts), nrow, scale, row_labels=labels)


def save_labelled_grid(blocks: dict, path: Path, nrow: int, scale: int = 4) -> None:
    """Write :func:`labelled_grid_image` of ``blocks`` as PNG."""
    save_png(labelled_grid_image(blocks, nrow, scale), path)


def heatmap_image(m, title: str):
    """A map (H, W) as a red-yellow-green heatmap with a colour bar and ``title`` (PIL image, matplotlib, headless)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(3.6, 3), dpi=100)
    im = ax.imshow(m.detach().float().cpu().numpy() if hasattr(m, "detach") else m, cmap="RdYlGn")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        return img.convert("RGB")
