"""Figures: reward curves as PNG (matplotlib, headless)."""

from __future__ import annotations

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
