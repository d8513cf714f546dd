"""The config's error messages and stand-ins (used by :mod:`pxpo.config`).

* :func:`input_error` turns pydantic's ``ValidationError`` into a
  :class:`~pxpo.errors.PxpoInputError` naming the file (or "command line"), the
  dotted field, the problem and the fix (closest valid key for a typo).
* :class:`Absent` stands in for a top-level key a Kubeflow task was not given:
  any use raises an error saying which section to add.
"""

from __future__ import annotations

import datetime
import difflib
from collections.abc import Iterable
from typing import Annotated, Any, get_args

from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import PxpoInputError


def _not_bool(value):
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "a boolean is not a number")
    return value


def _scalar_to_str(value):
    if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
        return str(value)  # YAML turns `revision: 1234` or `output_dir: 2024-01-01` into numbers/dates
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Str = Annotated[str, BeforeValidator(_scalar_to_str)]


def _fail(field: str, problem: str, fix: str) -> PydanticCustomError:  # a cross-field check; field relative to the model
    return PydanticCustomError("pxpo", "{problem}", {"field": field, "problem": problem, "fix": fix})


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class Absent:
    """Stands in for a top-level key not passed to this task: any use raises."""

    __slots__ = ("_key",)

    def __init__(self, key: str):
        object.__setattr__(self, "_key", key)

    def error(self, attr: str | None = None) -> PxpoInputError:
        where, key = self._key if attr is None else f"{self._key}.{attr}", self._key
        return PxpoInputError(where, f"{key!r} was not passed to this task", f"add {key!r} to the stage's sections in the pipeline")

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_key":  # keep copy/pickle/introspection protocols working
            raise AttributeError(name)
        raise self.error(name)

    def __reduce__(self):  # pickle and deepcopy
        return Absent, (self._key,)

    def __eq__(self, other) -> bool:
        return type(other) is Absent and other._key == self._key

    def __setattr__(self, name: str, value: Any) -> None:
        raise self.error(name)

    def __repr__(self) -> str:
        return f"<{self._key}: not passed to this task>"



# --- errors: pydantic's ValidationError -> PxpoInputError(file: field, problem, fix) ---

# What a failed type check expected, by pydantic error type prefix (first match wins).
_KINDS = {"bool_not_number": "a number", "int": "an integer", "float": "a number", "bool": "a boolean (true or false)",
          "string": "a string", "dict": "a mapping", "model": "a mapping of fields"}


def choose(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """The fix for an unknown name: the valid ones and the closest."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f"use one of {', '.join(valid)}" + (f"; did you mean {close[0]!r}?" if close else "")


def _problem_and_fix(err: dict, loc: tuple[str, ...], root: type[BaseModel]) -> tuple[str, str]:
    typ, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    cls = root  # the model holding loc[-1]
    for part in loc[:-1]:
        cls = getattr(cls.model_fields.get(part), "annotation", None) if _is_model(cls) else None
    if typ == "pxpo":
        return ctx["problem"], ctx["fix"]
    if typ == "extra_forbidden":
        return f"unknown key {loc[-1]!r}", choose(loc[-1], sorted(cls.model_fields) if _is_model(cls) else [])
    if typ == "literal_error":
        return f"unknown value {value!r}", f"use one of {', '.join(get_args(cls.model_fields[loc[-1]].annotation))}"
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {value!r}", f"set a value {op} {bound}"
    kind = next((k for prefix, k in _KINDS.items() if typ.startswith(prefix)), "a valid value")
    if value is None:
        return "must not be empty (null)", f"give {kind}"
    if kind == "a mapping of fields":
        return f"expected a mapping of fields, got {type(value).__name__}", "write key: value pairs under it"
    return f"{value!r} is not {kind}", f"give {kind}"


def input_error(e: ValidationError, source: str, root: type[BaseModel], prefix: tuple = (), overridden: Iterable[str] = ()) -> PxpoInputError:
    """The first error of ``e`` as a PxpoInputError naming the source, the dotted field and the fix."""
    errors = e.errors(include_url=False)
    locs = [prefix + tuple(map(str, er["loc"])) + (tuple(er["ctx"]["field"].split(".")) if er["type"] == "pxpo" else ()) for er in errors]
    err, loc, dotted = errors[0], locs[0], ".".join(locs[0])
    problem, fix = _problem_and_fix(err, loc, root)
    if len(errors) > 1:
        problem += f" (also: {', '.join('.'.join(lc) for lc in locs[1:])})"
    # Blame the command line for a field it set; for a cross-field check, when it set one of the sections involved.
    where = source
    involved = {loc[0]} if prefix or err["loc"] else {"sample", "train"}
    if any(dotted == k or dotted.startswith(k + ".") or k.startswith(dotted + ".") for k in overridden):
        where = "command line"
    elif err["type"] == "pxpo" and any(k.split(".")[0] in involved for k in overridden):
        where = "command line" if source == "defaults" else f"{source} with command-line overrides"
    return PxpoInputError(f"{where}: {dotted}", problem, fix)
