"""Formula labellers: constant maps and target luminance layouts."""

from typing import Any, Sequence

import torch

from pxpo.errors import PxpoInputError

from .common import _finite_float, _MaskSpec, _per_image_mean, _rgb, _unit_float, luminance
from .registry import LabelFn, register


@register("constant")
def constant(value: float = 1.0) -> LabelFn:
    """Constant map: every pixel gets ``value``. ``(B, 3, H, W) -> (B, H, W)``, range ``{value}``."""
    v = _finite_float(value, "reward.kwargs.value")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        b, _, h, w = images.shape
        maps = torch.full((b, h, w), v, dtype=torch.float32, device=images.device)
        return maps, {"scalar": [v] * b}

    return fn


_LAYOUTS = {
    "left_bright": "left",
    "right_bright": "right",
    "top_bright": "top",
    "bottom_bright": "bottom",
    "center_bright": "center",
    "all_bright": "all",
    "all_dark": None,
}


@register("brightness_target")
def brightness_target(layout: Any = "left_bright", low: float = 0.0, high: float = 1.0) -> LabelFn:
    """Target luminance per region: reward ``1 - |lum - target|`` per pixel.

    ``layout`` is one of ``left_bright``, ``right_bright``, ``top_bright``,
    ``bottom_bright``, ``center_bright`` (target ``high`` in the named region,
    ``low`` elsewhere), ``all_bright``, ``all_dark``; or a 2-D nested list /
    array of targets in ``[0, 1]`` of any size, resized bilinearly
    (``align_corners=False``) to ``H x W`` (``low``/``high`` are then unused).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``[0, 1]``, 1 on a perfect match.
    """
    lo = _unit_float(low, "reward.kwargs.low")
    hi = _unit_float(high, "reward.kwargs.high")
    if isinstance(layout, str):
        if layout not in _LAYOUTS:
            raise PxpoInputError(
                "reward.kwargs.layout",
                f"unknown layout {layout!r}",
                f"use one of: {', '.join(_LAYOUTS)}, or a 2-D list of target values in [0, 1]",
            )
        region = _LAYOUTS[layout]
        spec = _MaskSpec(region if region is not None else "all", "reward.kwargs.layout", "bilinear")
        scale = (hi - lo) if region is not None else 0.0

        def target(h: int, w: int, device: Any) -> torch.Tensor:
            return lo + scale * spec(h, w, device)

    else:
        grid_spec = _MaskSpec(layout, "reward.kwargs.layout", "bilinear", 0.0, 1.0)
        target = grid_spec

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        t = target(h, w, images.device)
        maps = 1.0 - (luminance(images).float() - t[None]).abs()
        return maps, {"mean": _per_image_mean(maps)}

    return fn


@register("contrast")
def contrast(gamma: float = 1.0) -> LabelFn:
    """Stroke / background contrast: ``|2 lum - 1| ** (2 gamma)`` per pixel, 1 for pure black or white, 0 for mid-grey.

    Asks for crisp strokes on a clean background without saying where the
    strokes go (compatible with any shape; an all-black image satisfies it too,
    which the KL to the reference and a gold reward guard against).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``[0, 1]``.
    """
    g = _finite_float(gamma, "reward.kwargs.gamma")
    if not g > 0:
        raise PxpoInputError("reward.kwargs.gamma", f"must be > 0, got {g}", "use e.g. gamma: 1.0")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        maps = (2 * luminance(images).float() - 1).abs().pow(2 * g)
        return maps, {"mean": _per_image_mean(maps)}

    return fn


_COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}


def _ink_target(colour: Any) -> torch.Tensor:
    """A named colour or an RGB triple in [0, 1] (not black) -> (3,) scaled so its brightest channel is 1."""
    if isinstance(colour, str):
        if colour not in _COLOURS:
            raise PxpoInputError("reward.kwargs.colour", f"unknown colour {colour!r}",
                                 f"use one of {', '.join(_COLOURS)} or an RGB list like [1.0, 0.5, 0.0]")
        return torch.tensor(_COLOURS[colour])
    rgb = _rgb(colour, "reward.kwargs.colour")
    if not rgb.max() > 0:
        raise PxpoInputError("reward.kwargs.colour", "black is not an ink colour", "give a colour with a channel above 0")
    return rgb / rgb.max()


@register("ink_colour")
def ink_colour(colour: Any = "red", floor: float = 0.25) -> LabelFn:
    """Ink in a target colour on a dark background, per pixel: ``1 - max_c |x_c - v target_c| / max(v, floor)``.

    ``v = max_c x_c`` is the pixel's ink strength (HSV value) and ``target`` the colour with its
    brightest channel scaled to 1. Where there is ink (``v >= floor``) the score is the ink's hue
    error alone, ``1 - max_c |x_c / v - target_c|``: 1 for the target colour, 0 for ink that misses
    it by full strength in some channel (white, green or blue against red), the same at any
    strength, so a dimmer stroke of the wrong colour scores no better than a bright one. Below
    ``floor`` (background, stroke edges) the error is scaled by ``v / floor`` towards 1 for black.
    Only recolouring the strokes raises it, which is why the reward and the prompted digit agree
    (the embedded default's task: its base model inks each digit in a random colour); erasing a
    stroke to near black is the one shortcut left, and a long way from the base model.

    ``colour``: a name (red, green, blue, yellow, cyan, magenta, white) or an RGB list in [0, 1];
    ``floor``: the ink strength in (0, 1] from which a pixel's hue counts in full.
    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``[0, 1]``.
    """
    target = _ink_target(colour)
    lo = _unit_float(floor, "reward.kwargs.floor")
    if not lo > 0:
        raise PxpoInputError("reward.kwargs.floor", f"must be in (0, 1], got {lo}", "use e.g. floor: 0.25")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        x = images.float().clamp(0, 1)
        v = x.amax(dim=1, keepdim=True)
        err = (x - v * target.to(x.device)[None, :, None, None]).abs().amax(dim=1)
        maps = 1.0 - err / v[:, 0].clamp_min(lo)
        return maps, {"mean": _per_image_mean(maps)}

    return fn
