"""Pixel credit for any differentiable scalar reward: gradient attribution, one backward pass per batch.

ALGORITHMS.md section 4, "Pixel credit from a scalar reward r(x) (attribution)".
For images ``x`` ``(B, 3, H, W)``, a differentiable scalar reward ``r(x)``
``(B,)`` and a baseline image ``x'`` (every value ``fill``, as occlusion's grey
patch):

* ``method="gradient"`` (gradient x input): ``a_p = sum_c (x - x')_cp
  dr/dx_cp (x)``; with ``fill=0`` the classic ``x * dr/dx``. One forward and
  one backward of the base per batch.
* ``method="integrated"`` (integrated gradients, Sundararajan et al. 2017,
  arXiv 1703.01365): ``a_p = sum_c (x - x')_cp * (1/k) sum_{i=1..k} dr/dx_cp
  (x' + (i/k) (x - x'))``, ``k = steps`` (a right Riemann sum: the last point
  is ``x``, whose reward is ``r(x)``). Completeness: ``sum_p a_p`` tends to
  ``r(x) - r(x')`` as ``k`` grows. ``k`` forwards and backwards.

Credit window: ``S_p`` is ``a`` summed over the ``patch x patch`` window
around pixel ``p`` (cut at the border, as occlusion's last patches are).
To first order ``S_p`` is the reward lost when that window is set to
``fill``: what :func:`~.adapters.occlusion_map` measures with one forward per
patch. So ``patch`` smooths the credit (local, not single-pixel noise) on the
scale occlusion would; ``patch=1`` is ``a`` itself, and for a linear reward
the map then equals occlusion's (``patch=1``, the same ``fill``) exactly.

Map: ``m = r(x) + S - mean_p(S)``. Each map's pixel mean is ``r(x)``
exactly, and a constant attribution (a reward that ignores the pixels, or
``S`` uniform) gives the constant map ``r``: DDPO's scalar reward, so PXPO's
update on ``m`` is DDPO's on ``r`` (tests/core/test_attribution.py pins both).

Samples must not interact inside the base (no batch statistics): the
gradient of ``sum_b r_b`` is taken once for the whole batch. The images are
never changed; the base sees them with ``requires_grad`` (its own
parameters need none: freeze them, as pxpo's CLIP labellers do).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from pxpo.errors import PxpoInputError

from .adapters import base_scalar_fn
from .common import _int_in
from .registry import LabelFn, ScalarFn, register

METHODS = ("gradient", "integrated")


def pixel_attribution(
    scalar_fn: ScalarFn,
    images: torch.Tensor,
    prompts: Sequence[str],
    method: str = "gradient",
    steps: int = 8,
    fill: Any = 0.5,
    *,
    max_batch: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw attribution ``a`` ``(B, H, W)`` float64 (channels summed) and the ``(B,)`` float64 rewards ``r(x)``.

    ``scalar_fn(images, prompts) -> (B,)`` must be differentiable with respect
    to ``images``. Images go to it in chunks of at most ``max_batch`` (all at
    once by default): one forward and one backward per chunk (``steps`` of
    each for ``integrated``).

    Raises:
        PxpoInputError: an unknown method, bad steps / fill, a reward without
            a gradient, or non-finite rewards.
    """
    if method not in METHODS:
        raise PxpoInputError("reward.kwargs.method", f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    k = 1 if method == "gradient" else _int_in(steps, "reward.kwargs.steps", 1, 1024)
    b = images.shape[0]
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=images.device).reshape(-1)
    if fill_t.numel() not in (1, 3) or not bool(torch.isfinite(fill_t).all()):
        raise PxpoInputError("reward.kwargs.fill", f"expected a number or an RGB triple, got {fill!r}", "use e.g. 0.5")
    fill_t = fill_t.reshape(1, -1, 1, 1)
    chunk = b if max_batch is None else max(1, int(max_batch))
    attrs, rewards = [], []
    for start in range(0, b, chunk):
        x = images[start : start + chunk].detach().float()
        p = list(prompts[start : start + chunk])
        delta = x - fill_t
        grad_sum = torch.zeros_like(x)
        for i in range(1, k + 1):
            xi = (fill_t + (i / k) * delta).requires_grad_(True)
            with torch.enable_grad():
                r = torch.as_tensor(scalar_fn(xi, p)).reshape(-1)
                if not r.requires_grad:
                    raise PxpoInputError("reward.kwargs.base", "the reward is not differentiable: it has no gradient with respect to the images",
                                         "use reward.name: occlusion for rewards without gradients (one forward per patch)")
                (g,) = torch.autograd.grad(r.sum(), xi, allow_unused=True)
            if g is not None:
                grad_sum += g.detach().float()
        attrs.append((delta.double() * grad_sum.double() / k).sum(dim=1))  # (c, H, W): channels summed
        rewards.append(r.detach().double())
    r_full = torch.cat(rewards)
    if r_full.numel() != b or not bool(torch.isfinite(r_full).all()):
        raise PxpoInputError("reward.base", "the scalar reward must return B finite values", "check the base reward")
    return torch.cat(attrs), r_full


def attribution_map(
    scalar_fn: ScalarFn,
    images: torch.Tensor,
    prompts: Sequence[str],
    method: str = "gradient",
    steps: int = 8,
    patch: int = 4,
    fill: Any = 0.5,
    *,
    max_batch: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A differentiable scalar reward as a map: ``(B, 3, H, W) -> (B, H, W)`` float32, and the ``(B,)`` float64 ``r(x)``.

    ``m = r(x) + S - mean_p(S)`` with ``S`` the :func:`pixel_attribution`
    summed over the ``patch x patch`` window around each pixel
    (:func:`window_sum`); each map's pixel mean is ``r(x)``.
    """
    patch = _int_in(patch, "reward.kwargs.patch", 1, 1 << 16)
    a, r_full = pixel_attribution(scalar_fn, images, prompts, method, steps, fill, max_batch=max_batch)
    s = window_sum(a, patch)
    maps = r_full.to(a.device)[:, None, None] + s - s.mean(dim=(1, 2), keepdim=True)
    return maps.float(), r_full.cpu()


def window_sum(a: torch.Tensor, patch: int) -> torch.Tensor:
    """Sum of ``a`` ``(B, H, W)`` over the ``patch x patch`` window around each pixel (zero outside the image)."""
    if patch == 1:
        return a
    lo, hi = (patch - 1) // 2, patch // 2
    padded = F.pad(a[:, None], (lo, hi, lo, hi))
    return F.avg_pool2d(padded, patch, stride=1)[:, 0] * (patch * patch)


@register("attribution")
def attribution_adapter(
    base: Any = "brightness_target",
    method: str = "gradient",
    steps: int = 8,
    patch: int = 4,
    fill: float = 0.5,
    base_kwargs: Optional[dict] = None,
    max_batch: Optional[int] = None,
) -> LabelFn:
    """Any differentiable scalar reward as a map by gradient attribution (see :func:`attribution_map`).

    ``base``, ``base_kwargs``, ``patch`` and ``fill`` as for ``occlusion``
    (``base``: a labeller name, a plugin or ``module:function``, whose
    scalar is the pixel mean of its map; ``fill``: the baseline image's value);
    ``method``: ``gradient`` (gradient x input) or ``integrated`` (integrated
    gradients over ``steps`` points); ``max_batch``: images per backward pass.

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; the pixel mean of each map equals the
    base scalar; ``info["scalar"]`` holds those scalars. Costs one forward and
    one backward of the base per batch (``steps`` of each for ``integrated``).
    """
    if method not in METHODS:
        raise PxpoInputError("reward.kwargs.method", f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    _int_in(patch, "reward.kwargs.patch", 1, 1 << 16)
    _int_in(steps, "reward.kwargs.steps", 1, 1024)
    scalar_fn = base_scalar_fn(base, base_kwargs)

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        maps, r = attribution_map(scalar_fn, images, prompts, method, steps, patch, fill, max_batch=max_batch)
        return maps.to(images.device), {"scalar": [float(v) for v in r]}

    return fn
