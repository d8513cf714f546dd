"""Human feedback: reward maps painted by people, in Label Studio or any painting tool.

``painted_maps`` reads one map per sample from a folder; :func:`brush_map`
turns a person's brush strokes (decoded masks plus their labels) into a
reward map. The mapping from strokes to values is defined here, once, and
used by ``pxpo label-studio pull``:

* every pixel starts at ``neutral`` (unpainted = no opinion);
* each stroke of label ``l`` sets the pixels it covers (mask ``>= 0.5``) to
  ``strengths[l]``; strokes are applied in the order the annotator made them,
  so a later stroke paints over an earlier one, as on the canvas;
* several annotations of one sample (several people, or one person twice)
  are averaged pixel by pixel (:func:`average_annotations`).
"""

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pxpo.errors import PxpoInputError

from .common import _finite_float, _int_in, _per_image_mean
from .registry import LabelFn, register

MAP_SUFFIXES = (".png", ".npy")
_INDEX_NAME = re.compile(r"^(\d+)$")


def brush_map(
    strokes: Sequence[tuple[str, Any]], strengths: Mapping[str, float], neutral: float, h: int, w: int, *, where: str = "annotation"
) -> torch.Tensor:
    """One annotation's reward map: ``strokes`` = ``[(label, mask (H, W) in [0, 1]), ...]`` -> ``(H, W)`` float32.

    Raises:
        PxpoInputError: a label without a strength, or a mask of the wrong size.
    """
    out = torch.full((h, w), float(neutral), dtype=torch.float32)
    for label, mask in strokes:
        if label not in strengths:
            raise PxpoInputError(
                f"{where}: label {label!r}", "has no strength", f"add it to label_studio.labels (known: {', '.join(sorted(strengths))})"
            )
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        if tuple(m.shape) != (h, w):
            raise PxpoInputError(where, f"brush mask of shape {tuple(m.shape)} on an image of {(h, w)}", "annotate the image at its own size")
        out[m >= 0.5] = float(strengths[label])
    return out


def average_annotations(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise mean of the maps of several annotations of one sample: ``[(H, W)] -> (H, W)``."""
    if not maps:
        raise ValueError("no annotations to average")
    return torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in maps]).mean(dim=0)


def _index_files(folder: Path) -> dict[int, Path]:
    """Sample index -> map file (``0.png``, ``000003.npy``, ...); two files for one index is an error."""
    found: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in MAP_SUFFIXES or not f.is_file():
            continue
        m = _INDEX_NAME.match(f.stem)
        if not m:
            continue
        i = int(m.group(1))
        if i in found:
            raise PxpoInputError(str(f), f"a second map for sample {i} (also {found[i].name})", "keep one file per sample index")
        found[i] = f
    return found


def _read_map(f: Path, low: float, high: float) -> np.ndarray:
    """A map file as an (H, W) float64 array in reward units."""
    if f.suffix.lower() == ".npy":
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PxpoInputError(str(f), f"unreadable .npy ({exc})", "save it with numpy.save(path, array_2d)") from exc
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise PxpoInputError(str(f), f"expected a 2-D numeric array, got {arr.dtype} of shape {arr.shape}", "save one (H, W) map per sample")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise PxpoInputError(str(f), "contains NaN or inf", "give finite reward values")
        if arr.min() < low or arr.max() > high:
            raise PxpoInputError(
                str(f), f"values in [{arr.min():.4g}, {arr.max():.4g}] leave the range [{low}, {high}]", "rescale the map or set reward.kwargs.low/high"
            )
        return arr
    from PIL import Image

    try:
        with Image.open(f) as im:
            im.load()
            if im.mode in ("L", "I;16", "I", "P") or (im.mode == "LA"):
                arr = np.asarray(im.convert("I") if im.mode in ("I;16", "I") else im.convert("L"), dtype=np.float64)
                full = 65535.0 if im.mode in ("I;16", "I") else 255.0
            elif im.mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
                    raise PxpoInputError(str(f), "a colour PNG (R, G and B differ)", "paint the map in grey: black = low, white = high")
                arr, full = rgb[..., 0], 255.0
            else:
                raise PxpoInputError(str(f), f"PNG mode {im.mode} is not a grey map", "save an 8- or 16-bit greyscale PNG")
    except OSError as exc:
        raise PxpoInputError(str(f), f"unreadable PNG ({exc})", "save an 8- or 16-bit greyscale PNG") from exc
    return low + (high - low) * arr / full


@register("painted_maps")
def painted_maps(path: Any = None, low: float = 0.0, high: float = 1.0, offset: int = 0) -> LabelFn:
    """Reward maps painted in any tool: one file per sample in the folder ``path``.

    Files are named by sample index (``7.png``, ``000007.png`` or ``7.npy``);
    image ``b`` of a call is sample ``offset + b`` (``pxpo label`` labels the
    whole trajectory artifact in one call, so the index is the artifact's
    sample index, the number in ``images/000007.png``).  Greyscale PNGs map
    black -> ``low`` and white -> ``high`` linearly (8 or 16 bit); ``.npy``
    files hold reward values directly and must lie in ``[low, high]``.  Each
    map must have the image's size exactly.  A missing sample, a wrong size or
    an out-of-range value is a :class:`PxpoInputError` (exit 2) naming the file.

    Shapes: ``(B, 3, H, W) -> (B, H, W)``; range ``[low, high]``.
    """
    if path is None:
        raise PxpoInputError("reward.kwargs.path", "the painted_maps labeller needs a folder", "set reward.kwargs.path to the folder of maps")
    folder = Path(path)
    if not folder.is_dir():
        raise PxpoInputError("reward.kwargs.path", f"{str(folder)!r} is not a folder", "give the folder holding one map per sample")
    lo = _finite_float(low, "reward.kwargs.low")
    hi = _finite_float(high, "reward.kwargs.high")
    if not hi > lo:
        raise PxpoInputError("reward.kwargs.high", f"high={hi} is not above low={lo}", "give low < high")
    start = _int_in(offset, "reward.kwargs.offset", 0, 2**31)

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        b, _, h, w = images.shape
        files = _index_files(folder)
        wanted = list(range(start, start + b))
        missing = [i for i in wanted if i not in files]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise PxpoInputError(
                str(folder), f"no map for {len(missing)} of {b} samples (indices {shown})", "paint every sample (e.g. 000003.png) or drop it from the artifact"
            )
        maps = []
        for i in wanted:
            arr = _read_map(files[i], lo, hi)
            if arr.shape != (h, w):
                raise PxpoInputError(str(files[i]), f"map of size {arr.shape} for an image of {(h, w)}", "paint the map at the image's size")
            maps.append(torch.from_numpy(arr).float())
        out = torch.stack(maps).to(images.device)
        return out, {"mean": _per_image_mean(out)}

    return fn

