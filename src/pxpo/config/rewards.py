"""The config of rewards: the trained ``reward`` (one labeller or several weighted ones) and labeller specs.

``reward`` keeps its single-labeller form (``name``, ``kwargs``) and accepts
``components`` instead: a list of ``{name, kwargs, weight, label}``, summed into
one map per sample (:mod:`pxpo.core.rewards.combine`), with ``normalize: group``
normalising each component per prompt group before weighting. The gold rewards
of ``evaluate.gold`` are :class:`LabellerSpec` entries (no weight). Labeller
names are checked against the registry (:mod:`pxpo.labellers` registers the
library's own, e.g. ``digit_fidelity``), the installed plugins (entry-point
group ``pxpo.labellers``) and the form of ``package.module:factory``
references (:mod:`pxpo.core.rewards.plugins`; their module is imported when
the labeller is built, not here). Used by :mod:`pxpo.config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .checks import Float, Str, _fail, input_error

_RESERVED_KEYS = ("mean", "std", "gain", "first", "last", "curve")  # reward_<key> must not shadow reward_mean etc.


def known_labellers() -> dict:
    """The labeller registry, with the library's labellers registered."""
    from .. import labellers  # noqa: F401  (registers digit_fidelity)
    from ..core.rewards import REGISTRY

    return REGISTRY


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise input_error(e, "assignment", type(self)) from None


def _check_name(name: str):
    """A built-in name, an installed plugin's or a well-formed ``package.module:factory`` (imported only when built)."""
    from ..core.rewards import name_problem

    known = known_labellers()
    if (problem := name_problem(name)) is not None:
        return _fail("name", problem, f"use one of {', '.join(sorted(known))} (`pxpo labellers` lists them), "
                                      "an installed plugin's name (entry-point group pxpo.labellers) or package.module:factory")
    return None


class LabellerSpec(_Spec):
    """One labeller by name: a gold reward (``evaluate.gold``) or, with a weight, a reward component."""

    name: Str = Field(description="A labeller: built-in, an installed plugin's name or package.module:factory (`pxpo labellers` lists them).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the labeller.")
    label: Str | None = Field(None, description="The key its mean is logged under (reward_<key> / gold_<key>; default: the name).")

    @property
    def key(self) -> str:
        """``label``, else the name (a ``module:function`` reference: the function's name, dots as ``_``)."""
        return self.label or self.name.rpartition(":")[2].replace(".", "_")

    @model_validator(mode="after")
    def _check(self) -> LabellerSpec:
        if (err := _check_name(self.name)) is not None:
            raise err
        if not self.key.replace("_", "").replace("-", "").isalnum() or self.key in _RESERVED_KEYS:
            raise _fail("label", f"{self.key!r} cannot be a metric key", f"give a label of letters, digits, _ and -, not one of {', '.join(_RESERVED_KEYS)}")
        return self


class RewardComponent(LabellerSpec):
    weight: Float = Field(1.0, description="Its weight in the sum (after normalising, with reward.normalize: group).")


class RewardConfig(_Spec):
    """The trained reward: one labeller (``name``, ``kwargs``) or several weighted ones (``components``)."""

    name: Str = Field("ink_colour", description="A labeller: built-in, an installed plugin's name (entry-point group pxpo.labellers) or package.module:factory (`pxpo labellers` lists them).")
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"colour": "red"}, description="Keyword arguments of the labeller.")
    components: list[RewardComponent] = Field(
        default_factory=list, description="Several labellers with weights, summed into one map per sample (instead of name / kwargs)."
    )
    normalize: Literal["none", "group"] = Field(
        "none", description='"none" (raw maps) or "group" (each component normalised per prompt group before weighting).'
    )
    preference_scale: Float = Field(
        1.0, gt=0, description="Aligned pairs (sample.pairs): the preference map of a pair is clip((map_A - map_B) * preference_scale, -1, 1) (issue 24)."
    )

    def labellers(self) -> list[RewardComponent]:
        """The components: ``components``, or the one labeller ``name`` with weight 1."""
        return list(self.components) or [RewardComponent(name=self.name, kwargs=self.kwargs)]

    def describe(self) -> str:
        """``brightness_target`` or ``0.5*brightness_target + 1*digit_fidelity`` (for summaries)."""
        if not self.components:
            return self.name
        norm = " (group-normalised)" if self.normalize == "group" else ""
        return " + ".join(f"{c.weight:g}*{c.key}" for c in self.components) + norm

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if (err := _check_name(self.name)) is not None:
            raise err
        if self.components:
            fields = RewardConfig.model_fields
            if self.name != fields["name"].default or self.kwargs != fields["kwargs"].default_factory():
                raise _fail("components", "both reward.name / reward.kwargs and reward.components are given",
                            "give one labeller (name, kwargs) or a list of components, not both")
            keys = [c.key for c in self.components]
            if len(set(keys)) != len(keys):
                raise _fail("components", f"two components have the same key in {keys}", "give one of them a distinct `label`")
            if all(c.weight == 0 for c in self.components):
                raise _fail("components", "every weight is 0", "give at least one component a non-zero weight")
        return self


def check_gold(sections: dict, given=None) -> None:
    """Cross-section checks of the whole config: a gold reward is not trained on; the gold gate has gold rewards.

    ``sections``: the config's top-level values; ``given``: the sections a restricted task was passed (None: all).
    """
    from .checks import Absent

    def present(k: str) -> bool:
        return not isinstance(sections.get(k), Absent) and (given is None or k in given)

    if present("reward") and present("evaluate"):
        trained = [(c.name, c.kwargs) for c in sections["reward"].labellers()]
        for i, g in enumerate(sections["evaluate"].gold):
            if (g.name, g.kwargs) in trained:
                raise _fail(f"evaluate.gold.{i}", f"{g.key!r} is also the trained reward (reward), so it is no gold standard",
                            "use a labeller training never sees as gold, or drop it from the reward")
    if present("evaluate") and present("register") and sections["register"].max_gold_drop is not None and not sections["evaluate"].gold:
        raise _fail("register.max_gold_drop", "is set but evaluate.gold names no gold reward", "add a labeller to evaluate.gold (e.g. digit_fidelity) or unset register.max_gold_drop")
