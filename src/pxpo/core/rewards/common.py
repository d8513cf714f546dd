"""Helpers shared by the labeller families: luminance, regions, grids, argument checks."""

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pxpo.errors import PxpoInputError

from .registry import LabelFn, ScalarFn

REGIONS = ("all", "left", "right", "top", "bottom", "center")


def luminance(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``: ``(B, 3, H, W) -> (B, H, W)``, range of the input."""
    return 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]


def constant_maps(values: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Broadcast one scalar per image to a map: ``(B,) -> (B, H, W)`` float32."""
    values = torch.as_tensor(values).float().reshape(-1)
    return values[:, None, None].expand(values.shape[0], h, w).contiguous()


def _per_image_mean(maps: torch.Tensor) -> list[float]:
    return [float(v) for v in maps.detach().double().mean(dim=(1, 2)).cpu()]


def region_mask(region: str, h: int, w: int, device: Any = None, what: str = "reward.kwargs.region") -> torch.Tensor:
    """Boolean ``(H, W)`` mask of a named region (see :data:`REGIONS`)."""
    ys = torch.arange(h, device=device, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float64)[None, :] + 0.5
    full = torch.ones(h, w, dtype=torch.bool, device=device)
    if region == "all":
        return full
    if region == "left":
        return full & (xs < w / 2)
    if region == "right":
        return full & (xs >= w / 2)
    if region == "top":
        return full & (ys < h / 2)
    if region == "bottom":
        return full & (ys >= h / 2)
    if region == "center":
        return (ys >= h / 4) & (ys < 3 * h / 4) & (xs >= w / 4) & (xs < 3 * w / 4)
    raise PxpoInputError(what, f"unknown region {region!r}", f"use one of: {', '.join(REGIONS)}")


def _as_grid(value: Any, what: str, lo: Optional[float] = None, hi: Optional[float] = None) -> torch.Tensor:
    """A nested list / ndarray / tensor as a non-empty finite 2-D float64 CPU tensor."""
    try:
        if isinstance(value, torch.Tensor):
            grid = value.detach().to("cpu", torch.float64)
        else:
            grid = torch.from_numpy(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise PxpoInputError(what, f"cannot read it as a 2-D array of numbers ({exc})", "give a nested list") from exc
    if grid.dim() != 2 or grid.numel() == 0:
        raise PxpoInputError(what, f"expected a non-empty 2-D array, got shape {tuple(grid.shape)}", "give rows of numbers")
    if not bool(torch.isfinite(grid).all()):
        raise PxpoInputError(what, "contains NaN or inf", "give finite numbers")
    if lo is not None and hi is not None and (grid.min() < lo or grid.max() > hi):
        raise PxpoInputError(what, f"values must lie in [{lo}, {hi}]", f"rescale the values to [{lo}, {hi}]")
    return grid


def _resize_grid(grid: torch.Tensor, h: int, w: int, mode: str, device: Any) -> torch.Tensor:
    """``(h0, w0) -> (H, W)`` float32 on ``device``."""
    g = grid.float()[None, None]
    if tuple(grid.shape) != (h, w):
        if mode == "bilinear":
            g = F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
        else:
            g = F.interpolate(g, size=(h, w), mode="nearest-exact")
    return g[0, 0].to(device)


def _unit_float(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise PxpoInputError(what, f"expected a number, got {value!r}", "give a number in [0, 1]") from exc
    if not 0.0 <= v <= 1.0:
        raise PxpoInputError(what, f"{v} is outside [0, 1]", "give a number in [0, 1]")
    return v


def _rgb(value: Any, what: str) -> torch.Tensor:
    try:
        rgb = [float(c) for c in value]
    except (TypeError, ValueError) as exc:
        raise PxpoInputError(what, f"expected an (r, g, b) triple, got {value!r}", "give three numbers in [0, 1]") from exc
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise PxpoInputError(what, f"expected three numbers in [0, 1], got {value!r}", "give e.g. [1.0, 0.0, 0.0]")
    return torch.tensor(rgb, dtype=torch.float32)


def _finite_float(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise PxpoInputError(what, f"expected a number, got {value!r}", "give a finite number") from exc
    if not math.isfinite(v):
        raise PxpoInputError(what, f"{v} is not finite", "give a finite number")
    return v


def _int_in(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise PxpoInputError(what, f"expected an integer in [{lo}, {hi}], got {value!r}", f"give an integer in [{lo}, {hi}]")
    return int(value)


class _MaskSpec:
    """A region name or a 2-D grid, turned into an ``(H, W)`` float mask (cached per size and device)."""

    def __init__(self, spec: Any, what: str, mode: str, lo: Optional[float] = None, hi: Optional[float] = None):
        self.what = what
        self.mode = mode
        self.name: Optional[str] = None
        self.grid: Optional[torch.Tensor] = None
        if isinstance(spec, str):
            region_mask(spec, 2, 2, what=what)  # validate the name now
            self.name = spec
        else:
            self.grid = _as_grid(spec, what, lo, hi)
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, h: int, w: int, device: Any) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._cache:
            if self.name is not None:
                m = region_mask(self.name, h, w, device, self.what).float()
            else:
                m = _resize_grid(self.grid, h, w, self.mode, device)
            self._cache[key] = m
        return self._cache[key]



def _scalar_labeller(scalar_fn: ScalarFn) -> LabelFn:
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        values = scalar_fn(images, prompts)
        return constant_maps(values, h, w).to(images.device), {"scalar": [float(v) for v in values]}

    return fn


