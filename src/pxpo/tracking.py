"""Experiment trackers the training loop receives (it never builds one itself).

:class:`NullTracker` for tests, :class:`JsonlTracker` writes ``metrics.jsonl``
in the run directory (one line per epoch) and the logged images as PNGs
(``images/<name>/step_XXXX.png``); :class:`FanOut` sends everything to several
trackers (``pxpo run --tracking-uri``: the run directory and MLflow). The MLflow
adapter is :class:`pxpo.mlflow.tracking.MlflowTracker`.

:class:`Tracker` declares every method the loop calls; the loop never probes
with ``hasattr``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

IMAGE_NAME = re.compile(r"^[\w.\-]+$")  # one directory level; MLflow image keys accept it as is


class Tracker(Protocol):
    """What the training loop calls on its tracker (main process only)."""

    def log_params(self, params: dict) -> None:
        """Record the resolved config (nested dict) once per run."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Record one epoch's scalar metrics at ``step`` (the epoch index)."""

    def log_image(self, image, name: str, step: int) -> None:
        """Record an image of series ``name`` at ``step`` (the epoch index).

        ``image``: a PIL image, an array (HW, HWC or CHW; uint8, or float in [0, 1]) or an image file.
        """

    def log_artifact(self, path: Path) -> None:
        """Record a file the run wrote."""

    def truncate(self, before_epoch: int) -> None:
        """Forget metrics and images of epochs >= ``before_epoch`` (a resumed run re-logs them)."""

    def history(self) -> list[dict]:
        """Every logged epoch's metrics, oldest first (``{"epoch": k, **metrics}``)."""


class NullTracker:
    """Drops everything (tests)."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_image(self, image, name: str, step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def truncate(self, before_epoch: int) -> None:
        pass

    def history(self) -> list[dict]:
        return []


def to_pil(image):
    """A PIL image (RGB or L) from a PIL image, an image file, or an array / tensor (HW, HWC or CHW; uint8, or float in [0, 1])."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    a = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def image_steps(run_dir: Path) -> dict[str, list[tuple[int, Path]]]:
    """The images a :class:`JsonlTracker` logged in ``run_dir``: ``{name: [(step, png), ...]}``, steps ascending."""
    root = Path(run_dir) / "images"
    out: dict[str, list[tuple[int, Path]]] = {}
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        steps = sorted((int(m.group(1)), f) for f in d.glob("step_*.png") if (m := re.fullmatch(r"step_(\d+)\.png", f.name)))
        if steps:
            out[d.name] = steps
    return out


class JsonlTracker:
    """Appends ``{"epoch": step, **metrics}`` lines to ``<run_dir>/metrics.jsonl``;
    images go to ``<run_dir>/images/<name>/step_XXXX.png`` (written to a temporary file, then renamed).

    On resume, lines and images for epochs at or after the resume point are
    dropped first (:meth:`truncate`), so the directory always matches the
    checkpointed state.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.images = Path(run_dir) / "images"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, before_epoch: int) -> None:
        for steps in image_steps(self.path.parent).values():
            for step, f in steps:
                if step >= before_epoch:
                    f.unlink()
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["epoch"] < before_epoch]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def log_params(self, params: dict) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(params, indent=2, default=str))

    def log_metrics(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": step, **metrics}) + "\n")

    def log_image(self, image, name: str, step: int) -> None:
        from .plots import save_png

        if not IMAGE_NAME.match(name):
            raise ValueError(f"image name {name!r}: use letters, digits, '_', '-' and '.' only (it names a directory)")
        save_png(to_pil(image), self.images / name / f"step_{int(step):04d}.png")

    def log_artifact(self, path: Path) -> None:
        pass


class FanOut:
    """Sends every call to each of ``trackers``; :meth:`history` is the first one's (the run directory's)."""

    def __init__(self, *trackers: Tracker):
        if not trackers:
            raise ValueError("FanOut needs at least one tracker")
        self.trackers = trackers

    def log_params(self, params: dict) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_image(self, image, name: str, step: int) -> None:
        for t in self.trackers:
            t.log_image(image, name, step)

    def log_artifact(self, path: Path) -> None:
        for t in self.trackers:
            t.log_artifact(path)

    def truncate(self, before_epoch: int) -> None:
        for t in self.trackers:
            t.truncate(before_epoch)

    def history(self) -> list[dict]:
        return self.trackers[0].history()
