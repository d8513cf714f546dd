"""Adapters: any scalar reward turned into a map by occlusion (:mod:`.attribution`: by its gradient)."""

from typing import Any, Callable, Optional, Sequence

import torch

from pxpo.errors import PxpoInputError

from .registry import LabelFn, ScalarFn, available, make_labeller, register


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


def base_scalar_fn(base: Any, base_kwargs: Optional[dict] = None) -> ScalarFn:
    """The scalar reward an adapter works on: a labeller name (registered, a plugin or
    ``module:function``; built with ``base_kwargs``; its scalar is the pixel mean of its map)
    or a callable ``fn(images, prompts)`` returning ``(B,)`` scalars or a ``LabelFn``'s result."""
    if isinstance(base, str):
        if base_kwargs is not None and not isinstance(base_kwargs, dict):
            raise PxpoInputError("reward.kwargs.base_kwargs", f"expected a mapping, got {base_kwargs!r}", "give a dict")
        return _as_scalar_fn(make_labeller(base, **(base_kwargs or {})))
    if callable(base):
        if base_kwargs:
            raise PxpoInputError("reward.kwargs.base_kwargs", "only used when base is a labeller name", "drop base_kwargs")
        return _as_scalar_fn(base)
    raise PxpoInputError(
        "reward.kwargs.base", f"expected a labeller name or a callable, got {base!r}", f"use one of: {', '.join(available())}"
    )


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

    ``base`` is a labeller name (registered, a plugin or ``module:function``;
    its scalar is the pixel mean of its map; built with ``base_kwargs``) or a
    callable ``fn(images, prompts)`` returning ``(B,)`` scalars (or a ``LabelFn``).
    For a differentiable reward, ``attribution`` gives a map from one backward
    pass instead (:mod:`.attribution`).

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; the pixel mean of each map equals the
    base scalar; ``info["scalar"]`` holds those scalars.  Costs ``1 +
    ceil(H/patch) * ceil(W/patch)`` evaluations of the base per image.
    """
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise PxpoInputError("reward.kwargs.patch", f"expected an integer >= 1, got {patch!r}", "use e.g. 4 or 8")
    scalar_fn = base_scalar_fn(base, base_kwargs)
    fill_v = fill

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        maps, r_full = _occlusion(scalar_fn, images, prompts, patch, fill_v, None)
        return maps, {"scalar": [float(v) for v in r_full]}

    return fn
