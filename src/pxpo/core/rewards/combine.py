"""Several rewards at once: a weighted sum of labellers' maps, one map per sample.

Reward hacking is the usual failure of RL fine-tuning: one proxy reward can be
maximised by images nobody wants. Weighting several rewards together (each
of which would be hacked differently) is one of the common answers; the
others are a KL penalty to the reference (:mod:`pxpo.core.kl`) and a gold
reward that training never sees (``evaluate.gold``, the promotion gate).

A component is a labeller (:data:`~.registry.LabelFn`) with a weight and a
key (the name its mean is logged under). Maps and scalars mix: a scalar
reward ``(B,)`` is a constant map (:func:`~.common.constant_maps`).

Combination (:func:`combine_maps`), for components k with weights w_k:

* ``normalize="none"``: ``R = sum_k w_k * r_k`` (raw maps);
* ``normalize="group"``: each component is first normalised within each
  prompt group (the samples of one prompt in the batch), as the flow methods
  aggregate several rewards' advantages (Flow-GRPO, arXiv 2505.05470, and its
  multi-reward successors): ``z_k = (r_k - mean_g) / (std_g + eps)`` with
  ``mean_g`` the group's per-position mean map and ``std_g`` the population
  std of the group's residuals (pxpo's advantage statistics,
  :mod:`pxpo.core.advantages`). Weights then compare like with like: a
  reward in kilobytes no longer drowns a reward in [0, 1]. For constant maps
  ``z_k`` is GRPO's scalar group advantage. A prompt with one sample in the
  batch has residual 0, so its normalised components are 0.

Shapes: images ``(B, 3, H, W)``, maps ``(B, H, W)``, scalars ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pxpo.errors import PxpoInputError

from ..advantages import group_advantages

from .common import constant_maps
from .registry import LabelFn

EPS = 1e-6
NORMALIZE = ("none", "group")


@dataclass(frozen=True)
class Component:
    """One weighted reward: ``key`` (logged as ``reward_<key>``), its labeller and weight."""

    key: str
    labeller: LabelFn
    weight: float = 1.0


def as_maps(values: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A component's output as maps: ``(B, H, W)`` as is, scalars ``(B,)`` as constant maps; float32."""
    if values.dim() == 1:
        return constant_maps(values, *hw).to(values.device)
    return values.float()


def group_normalize(maps: torch.Tensor, prompts: Sequence[str], eps: float = EPS) -> torch.Tensor:
    """Normalise maps ``(B, H, W)`` within each prompt group: per-position mean, one residual std.

    Returns ``(B, H, W)`` float32: zero mean per position and (about) unit
    population std over each group's elements; 0 for a group of one sample.
    """
    if len(prompts) != maps.shape[0]:
        raise PxpoInputError("prompts", f"{len(prompts)} prompts for {maps.shape[0]} maps", "pass one prompt per map")
    # the group statistics of GRPO's pixel-wise advantages: per-position mean, one std of the residuals
    return group_advantages(prompts, maps, baseline="position", std="group", eps=eps).to(maps.device)


def combine_maps(maps: Mapping[str, torch.Tensor], weights: Mapping[str, float], prompts: Sequence[str],
                 normalize: str = "none") -> torch.Tensor:
    """The weighted sum of the components' maps ``{key: (B, H, W)}`` -> ``(B, H, W)`` float32.

    ``normalize``: ``"none"`` (raw maps) or ``"group"`` (:func:`group_normalize` each first).
    """
    if normalize not in NORMALIZE:
        raise PxpoInputError("reward.normalize", f"unknown value {normalize!r}", f"use one of {', '.join(NORMALIZE)}")
    if not maps:
        raise PxpoInputError("reward.components", "no components", "give at least one labeller")
    total = None
    for key, m in maps.items():
        part = group_normalize(m, prompts) if normalize == "group" else m.float()
        total = weights[key] * part if total is None else total + weights[key] * part
    return total


def combined_labeller(components: Sequence[Component], normalize: str = "none") -> LabelFn:
    """One labeller from several weighted components.

    ``info`` holds, per component, ``reward_<key>``: the per-image means of
    its raw map (before normalising and weighting), which the loop logs as the
    component's mean. A component that fails names itself: an input error is
    re-raised with ``reward component '<key>'`` in front of what it names;
    any other error gets a note naming the component.
    """
    keys = [c.key for c in components]
    if len(set(keys)) != len(keys):
        raise PxpoInputError("reward.components", f"duplicate keys {keys}", "give each component a distinct label")
    if normalize not in NORMALIZE:
        raise PxpoInputError("reward.normalize", f"unknown value {normalize!r}", f"use one of {', '.join(NORMALIZE)}")

    def labeller(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        hw = tuple(images.shape[-2:])
        maps, info = {}, {}
        for c in components:
            try:
                out, _ = c.labeller(images, prompts)
                m = as_maps(torch.as_tensor(out), hw)
                if tuple(m.shape) != (images.shape[0], *hw) or not bool(torch.isfinite(m).all()):
                    raise PxpoInputError("reward.maps", f"expected finite maps of shape {(images.shape[0], *hw)}, got {tuple(m.shape)}",
                                         "the labeller must return finite (B, H, W) maps or (B,) scalars")
            except PxpoInputError as e:
                raise PxpoInputError(f"reward component {c.key!r}: {e.what}", e.problem, e.fix) from e
            except Exception as e:
                e.add_note(f"raised by reward component {c.key!r}")
                raise
            maps[c.key] = m
            info[f"reward_{c.key}"] = [float(v) for v in m.detach().double().mean((1, 2)).cpu()]
        combined = combine_maps(maps, {c.key: c.weight for c in components}, prompts, normalize)
        return combined, info

    return labeller


def component_means(info: Mapping) -> dict[str, float]:
    """``{"reward_<key>": mean}`` of the per-image component means in a labeller's ``info``."""
    return {k: sum(v) / len(v) for k, v in info.items() if k.startswith("reward_") and isinstance(v, list) and v}
