"""The labeller registry: ``register(name)``, ``make_labeller(name, **kwargs)`` (built-ins and plugins) and the map checks."""

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from pxpo.errors import PxpoInputError

from . import plugins


LabelFn = Callable[[torch.Tensor, Sequence[str]], tuple[torch.Tensor, dict]]
"""``fn(images (B, 3, H, W) in [0, 1], prompts: B strings) -> (maps (B, H, W) float32, info)``."""

ScalarFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
"""``fn(images (B, 3, H, W), prompts) -> (B,)`` scalar rewards."""

REGISTRY: dict[str, Callable[..., LabelFn]] = {}
"""Labeller name -> factory; ``factory(**kwargs)`` returns a :data:`LabelFn`."""

_FIX_MAPS = "labeller must return (B, H, W) finite maps"


# --------------------------------------------------------------------------
# registry


def register(name: str) -> Callable[[Callable[..., LabelFn]], Callable[..., LabelFn]]:
    """Decorator adding a labeller factory to :data:`REGISTRY` under ``name``."""

    def deco(factory: Callable[..., LabelFn]) -> Callable[..., LabelFn]:
        if name in REGISTRY:
            raise PxpoInputError(
                "reward.name", f"labeller {name!r} is already registered", "register it under another name"
            )
        REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Sorted names of the registered labellers."""
    return sorted(REGISTRY)


def name_problem(name: Any) -> Optional[str]:
    """None if ``name`` can name a labeller (registered, an installed plugin, a well-formed
    ``module:function``), else what is wrong. Imports no plugin (the config checks names with it)."""
    if not isinstance(name, str):
        return f"expected a labeller name, got {name!r}"
    if name in REGISTRY:
        return None
    if plugins.is_reference(name):
        return plugins.reference_problem(name)
    return None if plugins.entry_points(name) else f"unknown labeller {name!r}"


def origin(name: str) -> str:
    """Where labeller ``name`` comes from: ``built-in``, ``registered by <module>``,
    ``entry point <distribution> (<module:attr>)`` or ``module:function`` (nothing imported)."""
    if name in REGISTRY:
        module = getattr(REGISTRY[name], "__module__", "") or ""
        return "built-in" if module.split(".")[0] == "pxpo" else f"registered by {module}"
    if plugins.is_reference(name):
        return "module:function"
    eps = plugins.entry_points(name)
    return plugins.entry_point_origin(eps[0]) if eps else "unknown"


def lookup(name: Any) -> tuple[Callable[..., LabelFn], str]:
    """The factory of labeller ``name`` and its :func:`origin`; imports a plugin's module.

    Raises:
        PxpoInputError: unknown name (the message lists the known names), or a
            plugin that fails to load (:func:`.plugins.find_plugin`).
    """
    if isinstance(name, str) and name in REGISTRY:
        return REGISTRY[name], origin(name)
    found = plugins.find_plugin(name) if isinstance(name, str) else None
    if found is None:
        raise PxpoInputError(
            "reward.name",
            f"unknown labeller {name!r}",
            f"use one of: {', '.join(available())}; an installed plugin's name (entry-point group {plugins.GROUP}); "
            "or package.module:factory",
        )
    return found


def make_labeller(name: str, **kwargs: Any) -> LabelFn:
    """Build the labeller ``name`` (registered, a plugin or ``module:function``) with ``kwargs``.

    The returned function checks its inputs (``images`` ``(B, 3, H, W)``
    floating point, ``B`` prompts) and its output, and returns float32 maps
    and an info dict. The labeller inside may return ``(maps, info)`` or a bare
    tensor; scalars ``(B,)`` become constant maps (``info["scalar"]`` holds
    them), as :func:`~.common.constant_maps` does; maps ``(B, H, W)`` are
    checked with :func:`check_maps`. Gradients flow through (the
    ``attribution`` adapter differentiates a labeller's output).

    Raises:
        PxpoInputError: unknown ``name`` (the message lists the known names),
            a plugin that fails to load or to build, a keyword the factory
            does not take / rejects; when called, a result of the wrong type
            or shape (naming the labeller, where it came from and what came back).
    """
    factory, where = lookup(name)
    builtin = where == "built-in"
    try:
        inner = factory(**kwargs)
    except TypeError as exc:
        msg = str(exc)
        bad = [k for k in kwargs if f"'{k}'" in msg] or list(kwargs)
        what = f"reward.kwargs.{bad[0]}" if len(bad) == 1 else "reward.kwargs"
        raise PxpoInputError(
            what,
            f"labeller {name!r} ({where}) rejected argument(s) {', '.join(map(repr, bad)) or '(none)'}: {msg}",
            f"check the arguments of {name!r} (see {factory.__module__}.{getattr(factory, '__qualname__', factory)}); "
            "a plugin names a factory(**kwargs) that returns fn(images, prompts)",
        ) from exc
    except PxpoInputError:
        raise
    except Exception as exc:
        if builtin:
            raise
        raise PxpoInputError("reward.name", f"plugin {name!r} ({where}) failed to build: {type(exc).__name__}: {exc}",
                             "fix the plugin or its reward.kwargs") from exc
    if not callable(inner):
        raise PxpoInputError("reward.name", f"labeller factory {name!r} ({where}) returned a {type(inner).__name__}, not a function",
                             "return fn(images, prompts) -> (maps, info) from the factory")

    def labeller(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _check_images(images, prompts)
        return _as_maps(inner(images, prompts), tuple(images.shape), images.device, f"labeller {name!r} ({where})")

    labeller.__name__ = f"labeller_{name}"
    labeller.__doc__ = factory.__doc__
    return labeller


def _as_maps(out: Any, shape: tuple, device: Any, who: str) -> tuple[torch.Tensor, dict]:
    """A labeller's result as checked float32 ``(B, H, W)`` maps and an info dict (see :func:`make_labeller`)."""
    fix = "return (maps, info) from fn(images, prompts): maps (B, H, W) or scalars (B,), finite floats; info a dict"
    maps, info = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(maps)
    if not isinstance(maps, torch.Tensor):
        raise PxpoInputError("reward.maps", f"{who} returned a {type(out).__name__}, not a tensor or (tensor, info)", fix)
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise PxpoInputError("reward.maps", f"{who} returned info of type {type(info).__name__}", fix)
    b, _, h, w = shape
    if maps.dim() == 1 and maps.shape[0] == b:  # one scalar per image: a constant map each
        maps = maps.to(device).float()
        info = {"scalar": [float(v) for v in maps.detach().cpu()], **info}
        maps = maps[:, None, None].expand(b, h, w)
    try:
        check_maps(maps, shape)
    except PxpoInputError as e:
        raise PxpoInputError(e.what, f"{who} returned a tensor of shape {tuple(maps.shape)} for images {shape}: {e.problem}", fix) from None
    info = {k: v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v for k, v in info.items()}
    return maps.to(device).float(), info


# --------------------------------------------------------------------------
# checks and helpers


def _check_images(images: Any, prompts: Sequence[str]) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise PxpoInputError("images", f"expected a (B, 3, H, W) tensor, got {got}", "pass RGB images in [0, 1]")
    if not images.is_floating_point():
        raise PxpoInputError("images", f"expected a floating tensor, got {images.dtype}", "convert to float in [0, 1]")
    if len(prompts) != images.shape[0]:
        raise PxpoInputError(
            "prompts", f"got {len(prompts)} prompts for {images.shape[0]} images", "pass one prompt per image"
        )


def check_maps(maps: Any, images_shape: Sequence[int]) -> None:
    """Check that ``maps`` is a finite ``(B, H, W)`` tensor for images of shape ``(B, 3, H, W)``.

    Raises:
        PxpoInputError: wrong type or shape, or NaN / inf values.
    """
    b, _, h, w = tuple(images_shape)
    expected = (b, h, w)
    if not isinstance(maps, torch.Tensor):
        raise PxpoInputError(
            "reward.maps", f"expected a tensor of shape {expected}, got {type(maps).__name__}", _FIX_MAPS
        )
    if tuple(maps.shape) != expected:
        raise PxpoInputError(
            "reward.maps", f"expected shape (B, H, W) = {expected}, got {tuple(maps.shape)}", _FIX_MAPS
        )
    if not maps.is_floating_point():
        raise PxpoInputError("reward.maps", f"expected a floating tensor, got {maps.dtype}", _FIX_MAPS)
    if not bool(torch.isfinite(maps).all()):
        n_bad = int((~torch.isfinite(maps)).sum())
        raise PxpoInputError("reward.maps", f"{n_bad} values are NaN or inf", _FIX_MAPS)

