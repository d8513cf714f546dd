"""The pairwise Label Studio task: where is image A better than image B? (docs/labelling.md, issue 24)

The labelling page shows a pair's two images side by side, the prompt above
them, and one BrushLabels control on each image, with the labels of
``label.strengths``. A stroke of label ``l`` on A says "A is better here" with
strength ``strengths[l]``; the same stroke on B says B is better there. A
negative label (``bad: -1``) on A thus says A is worse there, i.e. B better.

One annotation -> one preference map ``m`` in [-1, 1] at image resolution:

* each image's strokes are turned into a map as painted maps are
  (:func:`pxpo.core.rewards.human.brush_map`: unpainted = 0, a stroke sets its
  strength where it covers >= 50 %, a later stroke over an earlier one);
* ``m = clip(map_A - map_B, -1, 1)``: +s where only A was painted with
  strength s, -s where only B was, the difference where both were (the same
  label on both: 0, no preference), 0 where neither was;
* several annotations of one pair are averaged pixel by pixel.

Which samples form a pair: the ``pair`` (int) and ``side`` ("A"/"B") fields of
``samples.jsonl`` when the trajectories were sampled in pairs; otherwise
consecutive samples ``(2p, 2p + 1)`` are pair ``p`` (A first).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence
from xml.sax.saxutils import quoteattr

import torch

from ..core.rewards.human import average_annotations, brush_map
from ..errors import PxpoInputError
from .brush import _COLOURS, annotation_strokes, brush_result

SIDES = {"A": ("better_a", "image_a"), "B": ("better_b", "image_b")}  # side -> (BrushLabels name, Image name)


def check_strengths(strengths: Mapping[str, float]) -> dict[str, float]:
    """label.strengths as pairwise strengths: every value finite and in [-1, 1] (a preference map's range)."""
    bad = {k: v for k, v in strengths.items() if not (math.isfinite(float(v)) and -1.0 <= float(v) <= 1.0)}
    if bad:
        raise PxpoInputError(
            "label.strengths", f"{bad} lie outside [-1, 1], the range of a preference map",
            "give pairwise projects strengths in [-1, 1], e.g. label.strengths='{better: 1.0, slightly: 0.5}'",
        )
    if not strengths:
        raise PxpoInputError("label.strengths", "no brush labels", "give e.g. {better: 1.0}")
    return {k: float(v) for k, v in strengths.items()}


def label_config(strengths: Mapping[str, float]) -> str:
    """The pairwise labelling page: the prompt, then A and B side by side, a brush on each."""
    legend = ", ".join(f"{k} = {v:+g}" for k, v in strengths.items())
    header = f"Paint on A where A is better, on B where B is better ({legend}); unpainted = no preference"

    def column(side: str) -> str:
        control, image = SIDES[side]
        labels = "\n".join(
            f'        <Label value={quoteattr(k)} background="{_COLOURS[i % len(_COLOURS)]}"/>' for i, k in enumerate(strengths)
        )
        return f"""    <View style="width: 50%; padding: 0 0.5em">
      <Header value="{side}"/>
      <BrushLabels name="{control}" toName="{image}">
{labels}
      </BrushLabels>
      <Image name="{image}" value="${image}" zoom="true" zoomControl="true" smoothing="false"/>
    </View>"""

    return f"""<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value={quoteattr(header)} size="6"/>
  <View style="display: flex; align-items: flex-start">
{column("A")}
{column("B")}
  </View>
</View>
"""


def sample_pairs(records: Sequence[dict], where: str) -> tuple[list[tuple[int, int, int]], str]:
    """``[(pair id, index of A, index of B), ...]`` sorted by pair id, and how they were found
    (``"fields"``: samples.jsonl's ``pair`` / ``side``; ``"consecutive"``: samples 2p and 2p + 1)."""
    tagged = [("pair" in r) or ("side" in r) for r in records]
    if not any(tagged):
        n = len(records)
        if n < 2 or n % 2:
            raise PxpoInputError(
                where, f"{n} samples without pair/side fields: consecutive samples (2p, 2p + 1) form the pairs, which needs an even number >= 2",
                "sample in pairs (their records carry pair and side) or give an even number of samples, A then B",
            )
        return [(p, 2 * p, 2 * p + 1) for p in range(n // 2)], "consecutive"
    seen: dict[int, dict[str, int]] = {}
    for i, r in enumerate(records):
        line = f"{where}:{i + 1}"
        if not tagged[i]:
            raise PxpoInputError(line, "a sample without pair/side fields among paired samples", "give every sample its pair and side, or none")
        pair, side = r.get("pair"), r.get("side")
        if isinstance(pair, bool) or not isinstance(pair, int) or pair < 0:
            raise PxpoInputError(f"{line}: field 'pair'", f"{pair!r} is not a non-negative integer", "store each sample's pair index as an int")
        if side not in SIDES:
            raise PxpoInputError(f"{line}: field 'side'", f"{side!r} is neither 'A' nor 'B'", 'store "A" or "B"')
        slot = seen.setdefault(pair, {})
        if side in slot:
            raise PxpoInputError(f"{line}: field 'side'", f"pair {pair} has a second {side} (also sample {slot[side]})", "give each pair one A and one B")
        slot[side] = i
    incomplete = sorted(p for p, s in seen.items() if len(s) != 2)
    if incomplete:
        raise PxpoInputError(where, f"pairs {incomplete[:10]} lack an A or a B", "give each pair one A and one B")
    return [(p, seen[p]["A"], seen[p]["B"]) for p in sorted(seen)], "fields"


def pair_prompt(prompt_a: str, prompt_b: str) -> str:
    return prompt_a if prompt_a == prompt_b else f"A: {prompt_a} | B: {prompt_b}"


def preference_map(annotation: dict, strengths: Mapping[str, float], h: int, w: int, *, where: str) -> torch.Tensor:
    """One finished annotation of a pair -> its (H, W) preference map ``clip(map_A - map_B, -1, 1)``."""
    side_maps = []
    for side, (control, image) in SIDES.items():
        strokes = annotation_strokes(annotation, h, w, where=f"{where}, image {side}", from_name=control, to_name=image)
        side_maps.append(brush_map(strokes, strengths, 0.0, h, w, where=f"{where}, image {side}"))
    return (side_maps[0] - side_maps[1]).clamp(-1.0, 1.0)


def task_preference(task: dict, strengths: Mapping[str, float], h: int, w: int, *, where: str) -> tuple[torch.Tensor | None, int]:
    """The averaged preference map of a pair task's finished annotations and their number (``None, 0`` when none)."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not done:
        return None, 0
    maps = [preference_map(a, strengths, h, w, where=f"{where}, annotation {a.get('id')}") for a in done]
    return average_annotations(maps), len(maps)


def prediction_results(diff: torch.Tensor, strengths: Mapping[str, float]) -> list[dict]:
    """Pre-annotation from a labeller: ``diff`` = map_A - map_B (H, W). The third of the pixels with the
    strongest preference is painted, with the most positive label, on the image it favours (A where
    diff > 0, B where diff < 0). A flat difference, or no positive label, gives no strokes."""
    pos = max(strengths, key=strengths.get)
    if not strengths[pos] > 0:
        return []
    d = diff.detach().double().cpu()
    t = torch.quantile(d.abs().flatten(), torch.tensor(2 / 3, dtype=torch.float64)).item()
    if not t > 0:
        return []
    strong = d.abs() >= t
    out = []
    for side, mask in (("A", strong & (d > 0)), ("B", strong & (d < 0))):
        m = mask.numpy()
        if m.any():
            out.append(brush_result(m, pos, *SIDES[side]))
    return out
