"""The labellers a config names: the core registry plus the library's own, and the configured reward and gold.

* ``digit_fidelity`` (registered here, not in the core: it fits a
  scikit-learn classifier on scikit-learn's digits): prompt fidelity on the
  embedded default. The map is constant per image, the probability that a
  logistic-regression digit classifier gives the digit the prompt names
  (``"a handwritten digit 7"`` -> 7), so 1.0 is a clearly recognisable
  prompted digit and about 0.1 is chance; with ``score: correct`` it is 1
  where the classifier picks the prompted digit (the mean is its accuracy). It is the embedded default's gold
  reward (``evaluate.gold``): training on brightness can paint the image
  white and lose the digit; this labeller notices.
* :func:`make_reward`: ``reward`` of the config as one labeller (one labeller,
  or the weighted combination of ``reward.components``, :mod:`pxpo.core.rewards.combine`).
* :func:`make_gold`: the gold labellers of ``evaluate.gold``, by key.
* :func:`print_labellers`: ``pxpo labellers``, every labeller and where it
  came from (built-in, an installed plugin's entry point, a ``module:function``
  the config names). Any labeller name may be a plugin
  (:mod:`pxpo.core.rewards.plugins`).
* ``clip_score`` and ``aesthetic``: transformers reward models, registered
  on import by :mod:`pxpo.reward_models`.

Importing this module registers ``digit_fidelity`` and ``http`` (a reward
model served over HTTP, :mod:`pxpo.rewards_http`); :mod:`pxpo.config`
imports it before checking labeller names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import reward_models  # noqa: F401  (registers clip_score and aesthetic: transformers reward models)
from .core.rewards import Component, LabelFn, combined_labeller, constant_maps, make_labeller, register
from . import rewards_http  # noqa: F401  (registers the http labeller: reward models served over HTTP)
from .errors import PxpoInputError

_DIGIT = re.compile(r"\bdigit\s+(\d)\b|\b(\d)\b")


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """A logistic-regression classifier of 8 x 8 digits (scikit-learn's data, ~97% accurate); fitted once per process.

    Used to check that samples are recognisable and follow the prompt.
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=2000).fit(d.data / 16.0, d.target)


def _features(images: torch.Tensor):
    """Images (B, 3, H, W) in [0, 1] -> (B, 64) ink-strength 8 x 8 features in [0, 1] (numpy), the classifier's input.

    Ink strength is the brightest channel (HSV value), so a digit reads the same in any ink colour
    (for grey images it is the grey level).
    """
    g = images.detach().float().cpu().amax(1, keepdim=True)
    return F.adaptive_avg_pool2d(g, 8).flatten(1).clamp(0, 1).numpy()


def classify_images(clf, images: torch.Tensor):
    """Predict digit classes (B,) of images (B, 3, H, W) in [0, 1] with :func:`digit_classifier`."""
    return clf.predict(_features(images))


def prompted_digit(prompt: str) -> int:
    """The digit a prompt names: ``"a handwritten digit 7"`` -> 7 (else the first lone digit)."""
    m = _DIGIT.search(prompt)
    if m is None:
        raise PxpoInputError(
            f"digit_fidelity: prompt {prompt!r}", "names no digit",
            "use digit_fidelity only with prompts like 'a handwritten digit 7' (or drop it from evaluate.gold / reward)",
        )
    return int(m.group(1) or m.group(2))


@register("digit_fidelity")
def digit_fidelity(score: str = "probability") -> LabelFn:
    """Prompt fidelity on the embedded default: P(prompted digit) under a digit classifier, as a constant map.

    ``score``: ``"probability"`` (the classifier's probability of the prompted digit) or
    ``"correct"`` (1 where the classifier's choice is the prompted digit, else 0: the mean is its accuracy).
    Either way ``info`` has both (``scalar``, ``correct``).
    """
    if score not in ("probability", "correct"):
        raise PxpoInputError("reward.kwargs.score", f"unknown score {score!r}", "use probability or correct")
    clf = digit_classifier()

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        target = [prompted_digit(p) for p in prompts]
        proba = clf.predict_proba(_features(images))
        cols = {int(c): j for j, c in enumerate(clf.classes_)}
        p = torch.tensor([float(proba[i, cols[d]]) for i, d in enumerate(target)])
        correct = [float(int(clf.classes_[proba[i].argmax()]) == d) for i, d in enumerate(target)]
        value = p if score == "probability" else torch.tensor(correct)
        return constant_maps(value, *images.shape[-2:]).to(images.device), {"scalar": p.tolist(), "correct": correct}

    return fn


def make_reward(reward_cfg) -> LabelFn:
    """The labeller of a ``reward`` config section: ``name`` / ``kwargs``, or the weighted ``components``."""
    if not reward_cfg.components:
        return make_labeller(reward_cfg.name, **reward_cfg.kwargs)
    comps = [Component(s.key, _labeller(s, f"reward.components[{i}]"), s.weight) for i, s in enumerate(reward_cfg.components)]
    return combined_labeller(comps, reward_cfg.normalize)


def make_gold(evaluate_cfg) -> dict[str, LabelFn]:
    """The gold labellers of ``evaluate.gold``, ``{key: labeller}`` (empty: no gold rewards)."""
    return {g.key: _labeller(g, f"evaluate.gold[{i}]") for i, g in enumerate(evaluate_cfg.gold)}


def _labeller(spec, where: str) -> LabelFn:
    try:
        return make_labeller(spec.name, **spec.kwargs)
    except PxpoInputError as e:
        raise PxpoInputError(f"{where} ({spec.key}): {e.what}", e.problem, e.fix) from e


def print_labellers(cfg=None) -> None:
    """Print every labeller with where it came from and its first doc line (``pxpo labellers``).

    Built-ins, the installed plugins (entry-point group ``pxpo.labellers``;
    each is imported, so a broken one shows here) and, given a config, the
    ``module:function`` references it names (reward, components, gold, an
    adapter's ``base``). Raises the first plugin's :class:`PxpoInputError`
    after printing the rest (exit 2).
    """
    from .core.rewards import REGISTRY, lookup, origin, plugins

    names = {n: origin(n) for n in sorted(REGISTRY)}
    for ep in plugins.entry_points():
        if ep.name in REGISTRY:
            names[f"{ep.name} (not used)"] = f"{plugins.entry_point_origin(ep)}, shadowed by the built-in"
        else:
            names.setdefault(ep.name, plugins.entry_point_origin(ep))
    specs = [*cfg.reward.labellers(), *cfg.evaluate.gold] if cfg is not None else []
    for ref in [s.name for s in specs] + [s.kwargs.get("base") for s in specs]:
        if isinstance(ref, str) and plugins.is_reference(ref):
            names.setdefault(ref, "module:function")
    errors, width = [], max(map(len, names))
    for name, where in names.items():
        line = ""
        if not name.endswith(" (not used)"):
            try:
                doc = (lookup(name)[0].__doc__ or "").strip().splitlines()
                line = doc[0] if doc else ""
            except PxpoInputError as e:
                errors.append(e)
                line = f"FAILS: {e.problem}"
        print(f"{name:{width}s}  {line}  [{where}]")
    if errors:
        raise errors[0]
