"""Label Studio's brush format <-> pxpo reward maps.

Decoding and encoding of the brush RLE use Label Studio's own maintained code,
``label_studio_sdk.converter.brush`` (label-studio-converter is archived). The
SDK's full dependency set pins OpenCV and an older numpy than pxpo's lock, so
pxpo's environment installs it without its dependencies
(``pip install --no-deps label-studio-sdk==2.1.2``, done by scripts/setup.sh);
its brush module needs only numpy and Pillow.

The stroke -> value mapping itself (neutral background, later strokes over
earlier ones, several annotators averaged) is
:func:`pxpo.core.rewards.human.brush_map` / ``average_annotations``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Mapping
from xml.sax.saxutils import quoteattr

import numpy as np
import torch

from ..core.rewards.human import average_annotations, brush_map
from ..errors import PxpoInputError

FROM_NAME = "reward"  # the BrushLabels control
TO_NAME = "image"  # the Image object
_COLOURS = ("#2e9e44", "#d7263d", "#1b98e0", "#f49d37", "#8f2d56", "#5c5c5c")


def sdk_brush():
    """``label_studio_sdk.converter.brush`` (its package's optional imports print to stdout: kept quiet)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from label_studio_sdk.converter import brush
    except ImportError as exc:
        raise PxpoInputError(
            "label_studio_sdk", f"not importable ({exc})", "install it with `pip install --no-deps label-studio-sdk==2.1.2` (scripts/setup.sh does)"
        ) from None
    return brush


def label_config(strengths: Mapping[str, float], neutral: float) -> str:
    """The labelling page: the prompt beside the image, one brush label per strength."""
    legend = ", ".join(f"{k} = {v:+g}" for k, v in strengths.items())
    labels = "\n".join(
        f'      <Label value={quoteattr(k)} background="{_COLOURS[i % len(_COLOURS)]}"/>' for i, k in enumerate(strengths)
    )
    return f"""<View>
  <View style="display: flex; align-items: flex-start">
    <View style="width: 60%">
      <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true" smoothing="false"/>
    </View>
    <View style="width: 40%; padding-left: 1em">
      <Header value="Prompt"/>
      <Text name="prompt" value="$prompt"/>
      <Header value={quoteattr(f"Paint: {legend}; unpainted = {neutral:+g}")} size="6"/>
    </View>
  </View>
  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">
{labels}
  </BrushLabels>
</View>
"""


def brush_result(mask: np.ndarray, label: str, from_name: str = FROM_NAME, to_name: str = TO_NAME) -> dict:
    """One brush stroke as Label Studio's result JSON: an (H, W) bool mask painted with ``label``
    (by the BrushLabels control ``from_name`` on the Image ``to_name``).

    The RLE has the layout the labelling page sends (checked in tests/test_label_studio.py with a
    real browser): 4 values per pixel, all the stroke's coverage (255 where painted).
    """
    brush = sdk_brush()
    h, w = mask.shape
    rgba = np.repeat(mask.astype(np.uint8).ravel() * 255, 4)
    return {
        "type": "brushlabels",
        "from_name": from_name,
        "to_name": to_name,
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "origin": "manual",
        "value": {"format": "rle", "rle": [int(v) for v in brush.encode_rle(rgba)], "brushlabels": [label]},
    }


def prediction_strokes(m: torch.Tensor, strengths: Mapping[str, float]) -> list[tuple[np.ndarray, str]]:
    """Pre-annotation from a labeller's (H, W) map: its top third painted with the most positive label,
    its bottom third with the most negative one (per-image terciles; a flat map gets no strokes)."""
    pos = max(strengths, key=strengths.get)
    neg = min(strengths, key=strengths.get)
    x = m.detach().double().cpu()
    lo, hi = torch.quantile(x.flatten(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).tolist()
    if not hi > lo:
        return []
    strokes = []
    if strengths[pos] > 0:
        strokes.append(((x >= hi).numpy(), pos))
    if strengths[neg] < 0:
        strokes.append(((x <= lo).numpy(), neg))
    return [(mask, lab) for mask, lab in strokes if mask.any()]


def annotation_strokes(annotation: dict, h: int, w: int, *, where: str, from_name: str = FROM_NAME, to_name: str | None = None) -> list[tuple[str, np.ndarray]]:
    """The brush strokes of control ``from_name`` in one annotation, in the order they were made:
    ``[(label, coverage (H, W) float32 in [0, 1]), ...]`` (decoded with the SDK). Results of other
    controls are ignored; with ``to_name`` a stroke of ``from_name`` on another object is an error."""
    brush = sdk_brush()
    strokes: list[tuple[str, np.ndarray]] = []
    for r in annotation.get("result") or []:
        if r.get("type", "").lower() != "brushlabels" or r.get("from_name") != from_name:
            continue
        if to_name is not None and r.get("to_name") != to_name:
            raise PxpoInputError(where, f"a {from_name!r} stroke on {r.get('to_name')!r}, not on {to_name!r}", "push the project again (its labelling page is outdated) and re-annotate")
        value = r.get("value") or {}
        rle = value.get("rle")
        labels = value.get("brushlabels") or []
        if rle is None or len(labels) != 1:
            raise PxpoInputError(where, f"a brush result without RLE or with labels {labels}", "paint each stroke with exactly one label")
        rh, rw = int(r.get("original_height", h)), int(r.get("original_width", w))
        if (rh, rw) != (h, w):
            raise PxpoInputError(where, f"annotated at {rh}x{rw}, the image is {h}x{w}", "push the trajectories again and re-annotate")
        flat = brush.decode_rle(rle)
        if flat.size != h * w * 4:
            raise PxpoInputError(where, f"brush RLE of {flat.size} values for a {h}x{w} RGBA canvas", "re-annotate the sample")
        alpha = np.reshape(flat, [h, w, 4])[:, :, 3]
        strokes.append((labels[0], alpha.astype(np.float32) / 255.0))
    return strokes


def annotation_map(annotation: dict, strengths: Mapping[str, float], neutral: float, h: int, w: int, *, where: str) -> torch.Tensor:
    """One finished annotation -> its (H, W) reward map (strokes decoded with the SDK, in order)."""
    return brush_map(annotation_strokes(annotation, h, w, where=where), strengths, neutral, h, w, where=where)


def task_map(task: dict, strengths: Mapping[str, float], neutral: float, h: int, w: int, *, where: str) -> tuple[torch.Tensor | None, int]:
    """The averaged map of a task's finished annotations and how many there were (``None, 0`` when none)."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not done:
        return None, 0
    maps = [annotation_map(a, strengths, neutral, h, w, where=f"{where}, annotation {a.get('id')}") for a in done]
    return average_annotations(maps), len(maps)
