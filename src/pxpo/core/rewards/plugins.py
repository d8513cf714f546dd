"""Labellers from outside pxpo: installed plugins (entry points) and ``package.module:factory`` references.

A team with its own reward does not edit pxpo. Two ways to name it in
``reward.name``, ``reward.components[].name`` or ``evaluate.gold[].name``
(and as the ``base`` of the ``occlusion`` / ``attribution`` adapters):

* ``"package.module:factory"``: any importable callable (dotted attributes
  after the colon are followed: ``"pkg.mod:Rewards.make"``);
* a plugin name: an installed distribution declares, in its
  ``pyproject.toml``::

      [project.entry-points."pxpo.labellers"]
      my_reward = "my_package.rewards:make_my_reward"

  and ``reward.name: my_reward`` finds it through
  ``importlib.metadata.entry_points(group="pxpo.labellers")``.

Both name a *factory*, as the built-ins do: ``factory(**reward.kwargs)``
returns the labeller ``fn(images, prompts)`` (images ``(B, 3, H, W)`` in
``[0, 1]``, ``B`` prompts) whose result is ``(maps, info)`` or a bare tensor:
maps ``(B, H, W)`` or scalars ``(B,)`` (a constant map each; the scalars go
to ``info["scalar"]``); see :func:`~.registry.make_labeller`. A built-in name
wins over a plugin of the same name. Anything that goes wrong (the module does
not import, the attribute is missing, two distributions claim one name) is a
:class:`~pxpo.errors.PxpoInputError` naming the plugin and the fix.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Optional

from pxpo.errors import PxpoInputError

GROUP = "pxpo.labellers"
"""The entry-point group installed packages register labeller factories in."""

_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_FIX_IMPORT = ("install the package that provides it in the environment running pxpo, or put its folder on PYTHONPATH "
               "(PYTHONPATH=. pxpo ...: the pxpo command does not search the current folder), or fix the error")


def is_reference(name: str) -> bool:
    """Whether ``name`` is meant as a ``module:function`` reference (it has a colon)."""
    return ":" in name


def reference_problem(name: str) -> Optional[str]:
    """None if ``name`` is a well-formed ``package.module:attribute``, else what is wrong (nothing is imported)."""
    if _REFERENCE.fullmatch(name):
        return None
    return f"{name!r} is not a 'package.module:factory' reference"


def entry_points(name: Optional[str] = None) -> list:
    """The ``pxpo.labellers`` entry points of the installed distributions (only those called ``name``, if given)."""
    from importlib.metadata import entry_points as _eps

    return [ep for ep in _eps(group=GROUP) if name is None or ep.name == name]


def entry_point_origin(ep: Any) -> str:
    """``entry point <distribution> (<module:attr>)``."""
    dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
    return f"entry point {dist} ({ep.value})"


def find_plugin(name: str) -> Optional[tuple[Callable[..., Any], str]]:
    """The factory ``name`` refers to and where it came from, or None when no plugin has that name.

    Imports the plugin's module. Raises:
        PxpoInputError: a malformed reference, a module that fails to import,
            a missing attribute, something that is not callable, or two
            distributions claiming the same entry-point name.
    """
    if is_reference(name):
        if (problem := reference_problem(name)) is not None:
            raise PxpoInputError("reward.name", problem, "write it as package.module:factory (e.g. my_rewards.scores:make_score)")
        module, _, attr = name.partition(":")
        return _load(name, "module:function", lambda: _import(module, attr)), "module:function"
    eps = entry_points(name)
    if not eps:
        return None
    if len({ep.value for ep in eps}) > 1:
        claims = "; ".join(entry_point_origin(ep) for ep in eps)
        raise PxpoInputError("reward.name", f"plugin {name!r} is declared by several installed distributions: {claims}",
                             "uninstall one of them, or name the factory directly as package.module:factory")
    origin = entry_point_origin(eps[0])
    return _load(name, origin, eps[0].load), origin


def _import(module: str, attr: str) -> Any:
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _load(name: str, origin: str, load: Callable[[], Any]) -> Callable[..., Any]:
    try:
        factory = load()
    except Exception as exc:  # a plugin's import may fail in any way: one message naming it
        raise PxpoInputError("reward.name", f"plugin {name!r} ({origin}) failed to load: {type(exc).__name__}: {exc}", _FIX_IMPORT) from exc
    if not callable(factory):
        raise PxpoInputError("reward.name", f"plugin {name!r} ({origin}) is a {type(factory).__name__}, not a factory",
                             "point it at a function factory(**kwargs) returning fn(images, prompts)")
    return factory
