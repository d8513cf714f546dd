"""The labeller registry: ``register(name)``, ``make_labeller(name, **kwargs)`` and the map checks."""

from typing import Any, Callable, Sequence

import torch

from pxpo.errors import PxpoInputError


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


def make_labeller(name: str, **kwargs: Any) -> LabelFn:
    """Build the labeller ``name`` with ``kwargs``.

    The returned function checks its inputs (``images`` ``(B, 3, H, W)``
    floating point, ``B`` prompts) and its output (:func:`check_maps`) and
    returns float32 maps.

    Raises:
        PxpoInputError: unknown ``name`` (the message lists the known names),
            or a keyword the factory does not take / rejects.
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise PxpoInputError(
            "reward.name",
            f"unknown labeller {name!r}",
            f"use one of: {', '.join(available())}",
        )
    factory = REGISTRY[name]
    try:
        inner = factory(**kwargs)
    except TypeError as exc:
        msg = str(exc)
        bad = [k for k in kwargs if f"'{k}'" in msg] or list(kwargs)
        what = f"reward.kwargs.{bad[0]}" if len(bad) == 1 else "reward.kwargs"
        raise PxpoInputError(
            what,
            f"labeller {name!r} rejected argument(s) {', '.join(map(repr, bad)) or '(none)'}: {msg}",
            f"check the arguments of {name!r} (see pxpo.core.rewards.{factory.__name__})",
        ) from exc

    def labeller(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        _check_images(images, prompts)
        maps, info = inner(images, prompts)
        check_maps(maps, tuple(images.shape))
        return maps.float(), info

    labeller.__name__ = f"labeller_{name}"
    labeller.__doc__ = factory.__doc__
    return labeller


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

