"""Mask and region labellers: colour control inside a region, segmentation-style ink masks."""

from typing import Any, Optional, Sequence

import torch

from .common import _finite_float, _MaskSpec, _per_image_mean, _rgb, luminance
from .registry import LabelFn, register


@register("color_target")
def color_target(color: Sequence[float] = (1.0, 0.0, 0.0), region: Any = "left", background: Optional[Sequence[float]] = None) -> LabelFn:
    """Colour control: pixels in ``region`` should have the RGB ``color``.

    Inside the region the reward is ``1 - mean_c |img_c - color_c|``; outside it
    is ``1 - mean_c |img_c - background_c|`` when ``background`` is given, else
    ``0``.  ``region`` is a region name (``all``, ``left``, ``right``, ``top``,
    ``bottom``, ``center``) or a 2-D mask (resized nearest, ``> 0.5`` inside).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``[0, 1]``.
    """
    target = _rgb(color, "reward.kwargs.color")
    bg = None if background is None else _rgb(background, "reward.kwargs.background")
    spec = _MaskSpec(region, "reward.kwargs.region", "nearest")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        inside = spec(h, w, images.device) > 0.5
        x = images.float()
        r_in = 1.0 - (x - target.to(x.device)[None, :, None, None]).abs().mean(dim=1)
        if bg is None:
            r_out = torch.zeros_like(r_in)
        else:
            r_out = 1.0 - (x - bg.to(x.device)[None, :, None, None]).abs().mean(dim=1)
        maps = torch.where(inside[None], r_in, r_out)
        return maps, {"mean": _per_image_mean(maps)}

    return fn


@register("mask_region")
def mask_region(mask: Any = "center", inside: float = 1.0, outside: float = -1.0) -> LabelFn:
    """Segmentation-style feedback: ink (luminance) wanted inside a mask, penalised outside.

    Reward is ``inside * lum`` where the mask is set and ``outside * lum``
    elsewhere.  ``mask`` is a region name or a 2-D nested list / array (resized
    nearest to ``H x W``; values ``> 0.5`` are inside).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range between ``min(0, inside,
    outside)`` and ``max(0, inside, outside)`` for images in ``[0, 1]``.
    """
    a = _finite_float(inside, "reward.kwargs.inside")
    b_out = _finite_float(outside, "reward.kwargs.outside")
    spec = _MaskSpec(mask, "reward.kwargs.mask", "nearest")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        m = spec(h, w, images.device) > 0.5
        lum = luminance(images).float()
        maps = torch.where(m[None], a * lum, b_out * lum)
        return maps, {"mean": _per_image_mean(maps)}

    return fn
