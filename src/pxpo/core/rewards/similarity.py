"""Similarity labellers: per-pixel SSIM against a reference image."""

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pxpo.errors import PxpoInputError

from .common import _finite_float, _int_in, _per_image_mean, _resize_grid, luminance
from .registry import LabelFn, register



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
