"""Container image references (the images the KFP components run in), derived from the package version so spec and image cannot drift.

``docker/Dockerfile.cpu`` and ``docker/Dockerfile.cuda`` build them; the KFP
components run in them. The registry prefix can be changed with the
``PXPO_IMAGE_REGISTRY`` environment variable at compile time.
"""

from __future__ import annotations

import os

from .. import __version__

DEFAULT_REGISTRY = "ghcr.io/pxpo"


def image_ref(kind: str = "cpu", registry: str | None = None, version: str = __version__) -> str:
    """``<registry>/pxpo-<kind>:<version>`` for kind ``cpu`` or ``cuda``."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"image kind must be 'cpu' or 'cuda', got {kind!r}")
    registry = registry or os.environ.get("PXPO_IMAGE_REGISTRY", DEFAULT_REGISTRY)
    return f"{registry.rstrip('/')}/pxpo-{kind}:{version}"
