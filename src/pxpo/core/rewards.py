"""Pixel-wise reward labellers: images and prompts in, one reward per pixel out.

PXPO (arXiv 2404.04356) replaces the single scalar reward of DDPO with a
*reward map*: a labeller scores every pixel of a decoded image, and the policy
gradient of each latent pixel is weighted by the (downsampled) reward of the
image pixels above it.  This module holds the labellers and their registry.

Map conventions
---------------
* A labeller is a :data:`LabelFn`: ``fn(images, prompts) -> (maps, info)``.
* ``images`` is a float tensor of shape ``(B, 3, H, W)`` with RGB values in
  ``[0, 1]``; ``prompts`` is a sequence of ``B`` strings (the labellers shipped
  here ignore them; they exist for prompt-conditioned labellers).
* ``maps`` is a float32 tensor of shape ``(B, H, W)``, finite, on the images'
  device.  Higher is better.  ``maps[b, y, x]`` is the reward of pixel
  ``(y, x)`` of image ``b``.
* ``info`` is a dict of plain python floats or lists of floats (one per image),
  safe to log.  Labellers derived from a scalar reward put it in
  ``info["scalar"]``.
* A scalar reward ``r`` becomes a map either as a constant map (every pixel
  gets ``r``, see :func:`constant_maps`) or, with credit assignment, through
  occlusion (:func:`occlusion_map`), whose pixel mean is still exactly ``r``.
* Labellers are built from the registry: ``make_labeller(name, **kwargs)``,
  where ``kwargs`` come from the user's config (``reward.kwargs``).  Bad names
  and arguments raise :class:`pxpo.errors.PxpoInputError`.

Region names (``"all"``, ``"left"``, ``"right"``, ``"top"``, ``"bottom"``,
``"center"``) are defined on pixel centres: ``"left"`` is the columns whose
centre lies left of ``W / 2``; ``"center"`` is the central rectangle of half
the height and half the width.
"""

import io
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pxpo.errors import PxpoInputError

LabelFn = Callable[[torch.Tensor, Sequence[str]], tuple[torch.Tensor, dict]]
"""``fn(images (B, 3, H, W) in [0, 1], prompts: B strings) -> (maps (B, H, W) float32, info)``."""

ScalarFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
"""``fn(images (B, 3, H, W), prompts) -> (B,)`` scalar rewards."""

REGISTRY: dict[str, Callable[..., LabelFn]] = {}
"""Labeller name -> factory; ``factory(**kwargs)`` returns a :data:`LabelFn`."""

REGIONS = ("all", "left", "right", "top", "bottom", "center")

_FIX_MAPS = "labeller must return (B, H, W) finite maps"


# --------------------------------------------------------------------------
# registry


def register(name: str) -> Callable[[Callable[..., LabelFn]], Callable[..., LabelFn]]:
    """Decorator adding a labeller factory to :data:`REGISTRY` under ``name``."""

    def deco(factory: Callable[..., LabelFn]) -> Callable[..., LabelFn]:
        if name in REGISTRY:
            raise PxpoInputError(
                "reward.name", f"labeller {name!r} is already registered", "register it under another name"
            )
        REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Sorted names of the registered labellers."""
    return sorted(REGISTRY)


def make_labeller(name: str, **kwargs: Any) -> LabelFn:
    """Build the labeller ``name`` with ``kwargs``.

    The returned function checks its inputs (``images`` ``(B, 3, H, W)``
    floating point, ``B`` prompts) and its output (:func:`check_maps`) and
    returns float32 maps.

    Raises:
        PxpoInputError: unknown ``name`` (the message lists the known names),
            or a keyword the factory does not take / rejects.
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise PxpoInputError(
            "reward.name",
            f"unknown labeller {name!r}",
            f"use one of: {', '.join(available())}",
        )
    factory = REGISTRY[name]
    try:
        inner = factory(**kwargs)
    except TypeError as exc:
        msg = str(exc)
        bad = [k for k in kwargs if f"'{k}'" in msg] or list(kwargs)
        what = f"reward.kwargs.{bad[0]}" if len(bad) == 1 else "reward.kwargs"
        raise PxpoInputError(
            what,
            f"labeller {name!r} rejected argument(s) {', '.join(map(repr, bad)) or '(none)'}: {msg}",
            f"check the arguments of {name!r} (see pxpo.core.rewards.{factory.__name__})",
        ) from exc

    def labeller(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _check_images(images, prompts)
        maps, info = inner(images, prompts)
        check_maps(maps, tuple(images.shape))
        return maps.float(), info

    labeller.__name__ = f"labeller_{name}"
    labeller.__doc__ = factory.__doc__
    return labeller


# --------------------------------------------------------------------------
# checks and helpers


def _check_images(images: Any, prompts: Sequence[str]) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise PxpoInputError("images", f"expected a (B, 3, H, W) tensor, got {got}", "pass RGB images in [0, 1]")
    if not images.is_floating_point():
        raise PxpoInputError("images", f"expected a floating tensor, got {images.dtype}", "convert to float in [0, 1]")
    if len(prompts) != images.shape[0]:
        raise PxpoInputError(
            "prompts", f"got {len(prompts)} prompts for {images.shape[0]} images", "pass one prompt per image"
        )


def check_maps(maps: Any, images_shape: Sequence[int]) -> None:
    """Check that ``maps`` is a finite ``(B, H, W)`` tensor for images of shape ``(B, 3, H, W)``.

    Raises:
        PxpoInputError: wrong type or shape, or NaN / inf values.
    """
    b, _, h, w = tuple(images_shape)
    expected = (b, h, w)
    if not isinstance(maps, torch.Tensor):
        raise PxpoInputError(
            "reward.maps", f"expected a tensor of shape {expected}, got {type(maps).__name__}", _FIX_MAPS
        )
    if tuple(maps.shape) != expected:
        raise PxpoInputError(
            "reward.maps", f"expected shape (B, H, W) = {expected}, got {tuple(maps.shape)}", _FIX_MAPS
        )
    if not maps.is_floating_point():
        raise PxpoInputError("reward.maps", f"expected a floating tensor, got {maps.dtype}", _FIX_MAPS)
    if not bool(torch.isfinite(maps).all()):
        n_bad = int((~torch.isfinite(maps)).sum())
        raise PxpoInputError("reward.maps", f"{n_bad} values are NaN or inf", _FIX_MAPS)


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


# --------------------------------------------------------------------------
# labellers


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


# ----- JPEG ----------------------------------------------------------------

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance).
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


def jpeg_quant_tables(quality: int) -> torch.Tensor:
    """Annex K tables scaled for ``quality`` (1..100) with the IJG formula: ``(2, 8, 8)`` float32 (Y, chroma)."""
    q = int(quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    base = torch.tensor([JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE], dtype=torch.int64)
    return torch.clamp(torch.div(base * scale + 50, 100, rounding_mode="floor"), 1, 255).float()


def dct_matrix(n: int = 8, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``n x n``): ``coeffs = D @ block @ D.T``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """JPEG/JFIF full-range RGB -> YCbCr on the 0..255 scale: ``(B, 3, H, W) in [0, 255] -> (B, 3, H, W)``."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([y, cb, cr], dim=1)


def jpeg_block_bits(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Estimated coded bits per 8x8 block: ``(B, 3, H, W) in [0, 1] -> (B, ceil(H/8), ceil(W/8))``.

    Baseline-JPEG-like pipeline without chroma subsampling: quantise to 8-bit,
    JFIF YCbCr, level shift by 128, edge-replicate padding to a multiple of 8,
    orthonormal 8x8 DCT-II, quantisation with the IJG-scaled Annex K tables
    (luminance table for Y, chrominance table for Cb/Cr).  Each non-zero
    quantised coefficient ``q`` costs ``log2(1 + |q|) + 2`` bits (magnitude
    bits plus a run/size-symbol overhead); zeros are free.  This is an estimate
    of entropy-coded size, not an exact Huffman count.
    """
    b, _, h, w = images.shape
    x = (images.detach().float().clamp(0.0, 1.0) * 255.0).round()
    x = rgb_to_ycbcr(x) - 128.0
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hb, wb = (h + ph) // 8, (w + pw) // 8
    blocks = x.reshape(b, 3, hb, 8, wb, 8).permute(0, 1, 2, 4, 3, 5)  # (B, 3, hb, wb, 8, 8)
    d = dct_matrix(8, torch.float32, x.device)
    coeffs = d @ blocks @ d.T
    tables = jpeg_quant_tables(quality).to(x.device)[[0, 1, 1]]  # (3, 8, 8)
    q = torch.round(coeffs / tables[None, :, None, None])
    bits = torch.where(q != 0, torch.log2(1.0 + q.abs()) + 2.0, torch.zeros_like(q))
    return bits.sum(dim=(1, 4, 5))  # (B, hb, wb)


@register("jpeg_block")
def jpeg_block(quality: int = 95, sign: float = 1.0) -> LabelFn:
    """Per-8x8-block JPEG coding cost map (see :func:`jpeg_block_bits`).

    Every pixel of a block gets ``block_bits / n / 8 / 1024 * sign`` where
    ``n`` is the number of the block's pixels inside the image (64 except for
    the partial blocks of the last row/column when ``H`` or ``W`` is not a
    multiple of 8), so the map's **sum** over an image is the estimated coded
    size in kB (1 kB = 1024 bytes) times ``sign``.  ``sign=-1`` gives the
    compressibility form (see ``jpeg_compressibility``).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; values have the sign of ``sign``;
    a block costs at most about ``3 * 64 * 12`` bits, so ``|value| <= ~0.28 * |sign|``.
    """
    qual = _int_in(quality, "reward.kwargs.quality", 1, 100)
    s = _finite_float(sign, "reward.kwargs.sign")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        bits = jpeg_block_bits(images, qual)  # (B, hb, wb)
        per_pixel = bits.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)[:, :h, :w]
        # pixels of each block that lie inside the image (64 for full blocks)
        rows = torch.full((bits.shape[1],), 8.0, device=bits.device)
        cols = torch.full((bits.shape[2],), 8.0, device=bits.device)
        rows[-1] = h - 8 * (bits.shape[1] - 1)
        cols[-1] = w - 8 * (bits.shape[2] - 1)
        n = (rows[:, None] * cols[None, :]).repeat_interleave(8, dim=0).repeat_interleave(8, dim=1)[:h, :w]
        maps = per_pixel / n[None] / 8.0 / 1024.0 * s
        kb = [float(v) for v in bits.double().sum(dim=(1, 2)).cpu() / 8.0 / 1024.0]
        return maps.float(), {"est_kb": kb, "scalar": [k * s for k in kb]}

    return fn


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> LabelFn:
    """``jpeg_block`` with ``sign=-1``: map sum is minus the estimated size in kB. ``(B, 3, H, W) -> (B, H, W)``, range ``<= 0``."""
    return jpeg_block(quality=quality, sign=-1.0)


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Actual PIL JPEG file size at ``quality`` in kB (bytes / 1000): ``(B, 3, H, W) -> (B,)`` float64 CPU."""
    arr = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGB").save(buf, format="JPEG", quality=int(quality))
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float64)


def _scalar_labeller(scalar_fn: ScalarFn) -> LabelFn:
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        values = scalar_fn(images, prompts)
        return constant_maps(values, h, w).to(images.device), {"scalar": [float(v) for v in values]}

    return fn


@register("jpeg_size")
def jpeg_size(quality: int = 95) -> LabelFn:
    """Actual JPEG size (PIL, ``quality``) in kB (bytes / 1000) as a constant map.

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``> 0``; ``info["scalar"]``
    holds the per-image sizes.
    """
    qual = _int_in(quality, "reward.kwargs.quality", 1, 100)
    return _scalar_labeller(lambda images, prompts: jpeg_sizes_kb(images, qual))


@register("compressibility")
def compressibility(quality: int = 95) -> LabelFn:
    """Minus the actual JPEG size in kB as a constant map (DDPO's compressibility reward).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``< 0``; ``info["scalar"]``
    holds the per-image rewards.
    """
    qual = _int_in(quality, "reward.kwargs.quality", 1, 100)
    return _scalar_labeller(lambda images, prompts: -jpeg_sizes_kb(images, qual))


# ----- SSIM ----------------------------------------------------------------


def _load_reference(reference: Any) -> torch.Tensor:
    """Reference as a ``(C, h, w)`` float32 CPU tensor in ``[0, 1]`` with ``C`` in ``{1, 3}``."""
    what = "reward.kwargs.reference"
    if hasattr(reference, "__fspath__"):
        reference = reference.__fspath__()
    if isinstance(reference, str):
        try:
            with Image.open(reference) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise PxpoInputError(what, f"cannot read image {reference!r} ({exc})", "give a readable image file") from exc
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    try:
        if isinstance(reference, torch.Tensor):
            ref = reference.detach().to("cpu", torch.float32)
        else:
            ref = torch.from_numpy(np.asarray(reference, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise PxpoInputError(what, f"cannot read it as an array ({exc})", "give a (3, H, W) or (H, W) array or a path") from exc
    if ref.dim() == 2:
        ref = ref[None]
    if ref.dim() != 3 or ref.shape[0] not in (1, 3) or ref.shape[1] == 0 or ref.shape[2] == 0:
        raise PxpoInputError(what, f"expected shape (3, H, W) or (H, W), got {tuple(ref.shape)}", "give an RGB or grey image")
    if not bool(torch.isfinite(ref).all()) or ref.min() < 0.0 or ref.max() > 1.0:
        raise PxpoInputError(what, "values must be finite and in [0, 1]", "rescale the reference to [0, 1]")
    return ref


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps: ``(size,)``."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of two single-channel batches in ``[0, 1]``: ``(B, H, W), (B or 1, H, W) -> (B, H, W)``.

    Gaussian window (separable), ``C1 = 0.01**2``, ``C2 = 0.03**2`` (data range
    1), ``same`` output size via reflect padding (replicate when the image is
    too small to reflect).
    """
    c1, c2 = 0.01**2, 0.03**2
    g = gaussian_window(window, sigma, torch.float32, x.device)
    pad = window // 2
    h, w = x.shape[-2:]
    mode = "reflect" if pad < h and pad < w else "replicate"

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (pad, pad, pad, pad), mode=mode) if pad else t
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    y = y[None] if y.dim() == 2 else y
    x = x.float()[:, None]
    y = y.float().expand(x.shape[0], -1, -1)[:, None]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5, H, W)
    b = stack.shape[0]
    blurred = blur(stack.reshape(b * 5, 1, h, w)).reshape(b, 5, h, w)
    mx, my, exx, eyy, exy = blurred.unbind(dim=1)
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return num / den


@register("ssim")
def ssim(reference: Any = None, window: int = 7, sigma: float = 1.5) -> LabelFn:
    """Per-pixel SSIM (luminance channel) against a reference image.

    ``reference`` is a ``(3, H, W)`` or ``(H, W)`` tensor / ndarray / nested
    list in ``[0, 1]`` or a path to an image file (read with PIL as RGB).  It
    is resized bilinearly to the images' ``H x W`` when sizes differ (once per
    size).  RGB references are reduced to BT.601 luminance.  ``window`` is the
    odd Gaussian window size, ``sigma`` its standard deviation.

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``[-1, 1]``, 1 where the image
    matches the reference.
    """
    if reference is None:
        raise PxpoInputError(
            "reward.kwargs.reference",
            "reference is required for the ssim labeller",
            "give a path to an image or a (3, H, W) / (H, W) array in [0, 1]",
        )
    win = _int_in(window, "reward.kwargs.window", 1, 255)
    if win % 2 == 0:
        raise PxpoInputError("reward.kwargs.window", f"window must be odd, got {win}", "use e.g. 7 or 11")
    sig = _finite_float(sigma, "reward.kwargs.sigma")
    if sig <= 0:
        raise PxpoInputError("reward.kwargs.sigma", f"sigma must be > 0, got {sig}", "use e.g. 1.5")
    ref = _load_reference(reference)
    ref_lum = luminance(ref[None])[0] if ref.shape[0] == 3 else ref[0]  # (h, w)
    cache: dict[tuple, torch.Tensor] = {}

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _, _, h, w = images.shape
        key = (h, w, str(images.device))
        if key not in cache:
            cache[key] = _resize_grid(ref_lum, h, w, "bilinear", images.device)
        maps = ssim_map(luminance(images), cache[key][None], win, sig)
        return maps, {"ssim": _per_image_mean(maps)}

    return fn


# ----- occlusion: any scalar reward -> map ----------------------------------


def _as_scalar_fn(fn: Callable) -> ScalarFn:
    """Wrap a scalar fn or a LabelFn so that it returns ``(B,)`` (a map's pixel mean)."""

    def scalar(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = fn(images, prompts)
        if isinstance(out, tuple):
            out = out[0]
        out = torch.as_tensor(out)
        if out.dim() == 3:
            out = out.double().mean(dim=(1, 2))
        return out.reshape(-1)

    return scalar


def occlusion_map(
    scalar_fn: ScalarFn,
    images: torch.Tensor,
    prompts: Sequence[str],
    patch: int = 4,
    fill: float = 0.5,
    *,
    max_batch: Optional[int] = None,
) -> torch.Tensor:
    """Turn a scalar reward into a map by occlusion: ``(B, 3, H, W) -> (B, H, W)`` float32.

    The image is cut into a non-overlapping ``patch x patch`` grid (the last
    row / column of patches may be smaller).  Each patch ``p`` in turn is set to
    ``fill`` and the image re-scored: ``drop_p = r_full - r_masked_p`` (positive
    when the patch helps the reward).  The map is
    ``r_full + drop_p - dbar`` over patch ``p``'s pixels, where ``dbar`` is the
    area-weighted mean drop, so the pixel mean of each map is exactly
    ``r_full``.

    ``scalar_fn(images, prompts) -> (B,)``.  All ``B * n_patches`` masked
    variants go to ``scalar_fn`` in one call, or in chunks of at most
    ``max_batch`` images when it is given.
    """
    return _occlusion(scalar_fn, images, prompts, patch, fill, max_batch)[0]


def _occlusion(
    scalar_fn: ScalarFn, images: torch.Tensor, prompts: Sequence[str], patch: int, fill: Any, max_batch: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`occlusion_map` plus the ``(B,)`` float64 full-image scalars."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise PxpoInputError("reward.kwargs.patch", f"expected an integer >= 1, got {patch!r}", "use e.g. 4 or 8")
    b, _, h, w = images.shape
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if fill_t.numel() not in (1, 3):
        raise PxpoInputError("reward.kwargs.fill", f"expected a number or an RGB triple, got {fill!r}", "use e.g. 0.5")
    fill_t = fill_t.reshape(1, -1, 1, 1)

    ys, xs = list(range(0, h, patch)), list(range(0, w, patch))
    n = len(ys) * len(xs)
    masks = torch.zeros(n, h, w, dtype=torch.bool, device=images.device)
    areas = torch.empty(n, dtype=torch.float64)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            k = i * len(xs) + j
            masks[k, y0 : y0 + patch, x0 : x0 + patch] = True
            areas[k] = min(patch, h - y0) * min(patch, w - x0)

    with torch.no_grad():
        r_full = torch.as_tensor(scalar_fn(images, prompts)).detach().double().reshape(-1).cpu()
        rep_prompts = [p for p in prompts for _ in range(n)]
        chunk = b * n if max_batch is None else max(1, int(max_batch))
        r_masked = []
        for start in range(0, b * n, chunk):
            idx = torch.arange(start, min(start + chunk, b * n), device=images.device)
            img_idx, patch_idx = idx // n, idx % n
            m = masks[patch_idx][:, None]  # (c, 1, H, W)
            variants = torch.where(m, fill_t, images[img_idx])
            out = scalar_fn(variants, rep_prompts[start : start + len(idx)])
            r_masked.append(torch.as_tensor(out).detach().double().reshape(-1).cpu())
        r_masked_t = torch.cat(r_masked).reshape(b, n)

    if r_full.numel() != b or not bool(torch.isfinite(r_full).all()) or not bool(torch.isfinite(r_masked_t).all()):
        raise PxpoInputError("reward.base", "the scalar reward must return B finite values", "check the base reward")
    drop = r_full[:, None] - r_masked_t  # (B, n)
    dbar = (drop * areas[None]).sum(dim=1, keepdim=True) / (h * w)
    per_patch = r_full[:, None] + drop - dbar  # (B, n)
    maps = (per_patch.to(images.device)[:, :, None, None] * masks[None].double()).sum(dim=1)
    return maps.float(), r_full


@register("occlusion")
def occlusion(base: Any = "jpeg_size", patch: int = 4, fill: float = 0.5, base_kwargs: Optional[dict] = None) -> LabelFn:
    """Any scalar reward as a map by occlusion (see :func:`occlusion_map`).

    ``base`` is the name of a registered labeller (its scalar is the pixel
    mean of its map; built with ``base_kwargs``) or a callable
    ``fn(images, prompts)`` returning ``(B,)`` scalars (or a ``LabelFn``).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; the pixel mean of each map equals the
    base scalar; ``info["scalar"]`` holds those scalars.  Costs ``1 +
    ceil(H/patch) * ceil(W/patch)`` evaluations of the base per image.
    """
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise PxpoInputError("reward.kwargs.patch", f"expected an integer >= 1, got {patch!r}", "use e.g. 4 or 8")
    if isinstance(base, str):
        if base_kwargs is not None and not isinstance(base_kwargs, dict):
            raise PxpoInputError("reward.kwargs.base_kwargs", f"expected a mapping, got {base_kwargs!r}", "give a dict")
        scalar_fn = _as_scalar_fn(make_labeller(base, **(base_kwargs or {})))
    elif callable(base):
        if base_kwargs:
            raise PxpoInputError("reward.kwargs.base_kwargs", "only used when base is a labeller name", "drop base_kwargs")
        scalar_fn = _as_scalar_fn(base)
    else:
        raise PxpoInputError(
            "reward.kwargs.base", f"expected a labeller name or a callable, got {base!r}", f"use one of: {', '.join(available())}"
        )
    fill_v = fill

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        maps, r_full = _occlusion(scalar_fn, images, prompts, patch, fill_v, None)
        return maps, {"scalar": [float(v) for v in r_full]}

    return fn
