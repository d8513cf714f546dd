"""The threshold comparisons of the promotion gate, written once; they fail closed.

Every gate of :mod:`pxpo.mlflow.promotion` and
:func:`pxpo.mlflow.model_registry.register_policy` compares a measured value
with a limit through :func:`passes`. A value that is missing, not a number,
NaN or infinite fails (``NaN > limit`` is false, so a bare comparison would let
a NaN drop through a ``<=`` bound, and an evaluation metric is a mean of
finite values: an infinity means it blew up); so does a limit that is NaN or
not a number. An infinite limit is a bound like any other (``max_drift: .inf``
never refuses, ``min_gain: .inf`` always does). The message names the value,
where it came from and the limit's config field.
"""

from __future__ import annotations

import math
import operator

# op -> (comparison, the operator that holds when it fails)
_OPS = {">": (operator.gt, "<="), ">=": (operator.ge, "<"), "<": (operator.lt, ">="), "<=": (operator.le, ">")}


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_number(value, name: str, source: str | None = None) -> tuple[float | None, str | None]:
    """``(float(value), None)`` for a finite real number, else ``(None, problem)``.

    ``problem`` reads e.g. ``"reward_gain is NaN in eval/metrics.json"``,
    ``"drift_pixel_l1 is missing from eval/metrics.json"`` or
    ``"reward_mean is 'high' in eval/metrics.json, not a number"``.
    """
    where = f" in {source}" if source else ""
    if value is None:
        return None, f"{name} is missing" + (f" from {source}" if source else "")
    if not _is_real(value):
        return None, f"{name} is {value!r}{where}, not a number"
    v = float(value)
    if math.isnan(v):
        return None, f"{name} is NaN{where}"
    if math.isinf(v):
        return None, f"{name} is {v}{where}"
    return v, None


def passes(value, op: str, limit, name: str, *, limit_name: str, source: str | None = None,
           fmt: str = ".4f") -> tuple[bool, str]:
    """``(ok, message)`` of ``value <op> limit``, failing closed.

    Args:
        value: the measured value (None: missing).
        op: ``">"``, ``">="``, ``"<"`` or ``"<="``: what must hold to pass.
        limit: the threshold (a config value).
        name: what ``value`` is, as the message shows it (e.g. ``"reward_gain"``).
        limit_name: the threshold's config field (e.g. ``"register.min_gain"``).
        source: where ``value`` came from (e.g. the metrics file), for a bad value.
        fmt: the format of ``value`` in the message.

    Returns:
        ``ok`` and a message: ``"drift_pixel_l1 0.1000 <= register.max_drift 0.3"``
        when it passes, ``"drift_pixel_l1 0.4000 > register.max_drift 0.3"``
        when it fails, ``"drift_pixel_l1 is NaN in eval/metrics.json:
        register.max_drift 0.3 fails closed"`` for a bad value and
        ``"register.max_drift is nan, not a number: no drift_pixel_l1 passes it"``
        for a bad limit.
    """
    compare, negation = _OPS[op]
    if not _is_real(limit) or math.isnan(limit):
        return False, f"{limit_name} is {limit!r}, not a number: no {name} passes it"
    v, problem = check_number(value, name, source)
    if problem:
        return False, f"{problem}: {limit_name} {limit} fails closed"
    ok = bool(compare(v, limit))
    return ok, f"{name} {v:{fmt}} {op if ok else negation} {limit_name} {limit}"


def champion_gate(challenger, champion, *, version: str, champion_version: str | None, primary_metric: str,
                  higher_is_better: bool = True, margin: float = 0.0, field_prefix: str = "",
                  source: str = "the metrics") -> tuple[str | None, str]:
    """``(failed gate or None, phrase)``: does the challenger (``version``) beat the champion by more than ``margin``?

    ``challenger``/``champion``: their ``primary_metric`` (``champion_version``
    None: there is no champion, and the challenger passes; the same version:
    it already is the champion). Fails closed: a challenger value that is not
    a finite number fails gate ``{field_prefix}primary_metric``; a champion
    value that is missing or not finite (moved there by hand) fails
    ``{field_prefix}margin``, as does an improvement not above ``margin``.
    """
    value, problem = check_number(challenger, primary_metric, source)
    if problem:
        return f"{field_prefix}primary_metric", f"{problem}: not comparable with a champion"
    if champion_version is None:
        return None, "no champion yet"
    if champion_version == version:
        return None, f"v{version} already is the champion"
    champ, problem = check_number(champion, f"champion v{champion_version}'s {primary_metric}", "its logged model's metrics")
    if problem:
        return f"{field_prefix}margin", f"{problem}: not comparable; move the alias by hand"
    delta = (value - champ) if higher_is_better else (champ - value)
    ok, phrase = passes(delta, ">", margin, f"{primary_metric} {value:.4f} vs champion v{champion_version} {champ:.4f}: improvement",
                        limit_name=f"{field_prefix}margin", fmt="+.4f")
    return (None if ok else f"{field_prefix}margin"), phrase
